"""The real compiler on the CPU machine (tests/compile_check.py): every Triton kernel at every
specialisation its launcher picks on CUDA compiles for sm_80 and sm_90 with no spill, shared memory
within the target's limit, two or more blocks per SM for the contrastive matrix kernels and wgmma
for fp16/bf16 products on sm_90; csrc/ compiles with nvcc for both with no spill.

The default run checks the contrastive and region kernels, csrc/, and the attention kernels' autotune
candidates in their heaviest variant (every mask, length, causal and dropout at once; fp16 and fp32;
head dims 64, 128, 256); `pytest -m compile -s` runs every part, every attention variant, dtype and
head dim too (the fp32 tiles take ptxas seconds to tens of seconds each), and prints the tables.
Results are cached (compile_check.cache_dir()).
"""
from pathlib import Path

import pytest

from mmkernels.ops._common import HAS_TRITON

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(not HAS_TRITON, reason="needs triton's compiler")]


@pytest.fixture(scope="module")
def check():
    import compile_check

    return compile_check


def _family(check, family: str, capsys):
    rows = check.build_rows(check.record_launches((family,))[family])
    text = check.table(rows)
    with capsys.disabled():
        print(f"\n== {family}: {len(rows)} compiled specialisations (sm_80, sm_90)\n{text}")
    bad = [f"{r.kernel} sm_{r.job.cc} {r.dtype} {check.describe(r)}: {'; '.join(r.problems())}  [{r.labels[0]}]"
           for r in rows if r.problems()]
    assert not bad, f"{len(bad)} specialisations break the compile budget:\n" + "\n".join(bad)


def test_contrastive_kernels_compile_within_budget(check, capsys):
    _family(check, "contrastive", capsys)


def test_region_kernels_compile_within_budget(check, capsys):
    _family(check, "region", capsys)


def test_attention_kernels_compile_within_budget(check, capsys, request):
    """Every autotune candidate of the three attention kernels, in the heaviest variant; under
    `pytest -m compile` in every variant, dtype and head dim (minutes of ptxas: the fp32 tiles)."""
    full = "compile" in (request.config.getoption("markexpr") or "")
    _family(check, "attention" if full else "attention-ci", capsys)


def test_csrc_compiles_without_spills(check, capsys):
    if check.nvcc() is None:
        pytest.skip("nvcc not found")
    rows = check.compile_csrc(Path(__file__).resolve().parents[2])
    with capsys.disabled():
        print("\n== csrc (nvcc -Xptxas -v)\n" + check.csrc_table(rows))
    assert rows, "nvcc -Xptxas -v reported no entry function"
    spilling = [r for r in rows if r[4] or r[5]]
    assert not spilling, f"spills: {spilling}"
