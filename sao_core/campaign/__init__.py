"""A campaign: rounds one after another, each starting from the last model promoted.

promotion        the promotion rule: the checks a candidate must pass and the decision
ledger           the promotion records (immutable, numbered), CURRENT, history, promote and rollback
planning         the next round's number and start model from the ledger
round_report     a round's report: stage counts, sample chains, evaluation headline
campaign_report  each round's outcome record and the campaign's table and plot
lineage          where a model or pair came from: stages, hashes, promotions
"""
