"""``moa eval``: does MoA beat your best single model on your own questions?

Targets answer a workload; judges compare their answers pairwise with a reference (AlpacaEval
style) or grade them 1-10 (MT-Bench style); the report gives win rates and scores with bootstrap
intervals, a length-controlled win rate, judge agreement and the cost of targets and judging apart.
"""
