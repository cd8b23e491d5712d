"""Scoring a trained policy: does this round's model beat the one it would replace?

compare     contenders answer the evaluation set (store.evalsets) and the judge compares them in both
            orders; the judge's agreement with the labelled trust pairs
eval_stages the evaluation's and downstream's stages in the store ({model}/eval/{settings hash}/), run
            by the shard runner wherever the round's shards run
winrate     win rate with a bootstrap interval, order consistency, bias and length-controlled win rate
downstream  lm-eval tasks (bundled, offline) on the candidate and the current model
"""
