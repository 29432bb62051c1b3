"""Benchmarks of every op against what a user would run instead, as one command:

    python -m mmkernels.bench [--quick | --dry-run] [--out bench] [--ops contrastive,attention,region,model]

pytest-benchmark times the cases (cases.py, which `pytest benchmarks/ --benchmark-only` runs too);
report.py turns its JSON into bench/<gpu-name>/results.csv (Liger-Kernel's benchmark schema), one
plot per op and summary.md.
"""
