"""Seeing what a model did: depth analyses of a checkpoint, direct logit attribution, the sweep report, and every
figure.

    depth.py         per-layer analyses of a checkpoint (`pretrain analyze-depth`; Csordas et al.'s included)
    attribution.py   exact direct logit attribution of a norm-free model (`pretrain attribute`)
    report.py        REPORT.md + report.html of runs or a sweep (`pretrain report`)
    report_table.py  the report's data: run folders read, Table 1 at equal tokens
    figures.py       every figure, once (plot, report, analyze-depth, attribute, TensorBoard's variance image)

The commands live in pretrain/cli/; nothing here imports them or the training loop.
"""
