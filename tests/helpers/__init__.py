"""Helpers shared by the tests (not tests themselves): data corpora and a CLI harness (data.py), running
`pretrain train` for real (train.py), ranks on gloo (distributed.py), packed SFT rows (sft.py), the norm schemes'
hand-written formulas (scheme_formulas.py), and the scripts some tests run as a training process (scripts/)."""
