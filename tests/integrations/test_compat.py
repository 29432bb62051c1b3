"""Whether a transformers patch applies is decided by the code it mirrors (integrations/transformers/compat.py):
the installed release's fingerprints are recorded, a one-line change to a declared definition
leaves exactly the patches that declare it unpatched, naming it, and the force switch still forces."""
import ast
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LxmertConfig, LxmertModel  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels.integrations.patching import StrictPatchError, _load_patchers  # noqa: E402
from mmkernels.integrations.transformers import compat  # noqa: E402
from test_patch_hf import build  # noqa: E402

CLIP = "transformers.models.clip.modeling_clip"


@pytest.fixture(autouse=True)
def fresh_fingerprints(monkeypatch):
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    compat.clear_cache()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mmkernels.patch leaves")
        yield
    compat.clear_cache()


def change_one_line(monkeypatch, name: str) -> None:
    """Make the fingerprints read the installed source of `name`'s module with one statement added
    at the top of the definition `name` ("module:Qualified.name")."""
    module, qualname = name.split(":")
    source = compat._module_source(module)
    node = compat._find(ast.parse(source), qualname)
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    first = body[0]
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + "_changed_by_a_new_release = 1\n")
    changed = "".join(lines)
    real = compat._module_source
    monkeypatch.setattr(compat, "_module_source",
                        lambda m, root=None: changed if (m == module and root is None) else real(m, root))
    compat.clear_cache()


def test_the_installed_transformers_code_is_recorded():
    """Fails on a transformers release whose code the patches mirror changed: read the changes
    against the patches, run the suite with MMKERNELS_PATCH_UNTESTED_TRANSFORMERS=1, then record it
    with `python -m mmkernels.integrations.transformers.compat record` (one small commit)."""
    import transformers

    _load_patchers()
    declared = compat.declared()
    assert len(declared) >= 18
    changed = {key: compat.unrecorded(names) for key, names in declared.items()}
    changed = {key: names for key, names in changed.items() if names}
    assert not changed, (
        f"transformers {transformers.__version__} has code mmkernels' patches were not tested on: "
        + "; ".join(f"{key}: {', '.join(names)}" for key, names in sorted(changed.items())))


def test_a_fingerprint_follows_the_code_not_its_formatting(monkeypatch, tmp_path):
    def fingerprint_of(text):
        (tmp_path / "fake.py").write_text(text)
        compat.clear_cache()
        return compat.fingerprint("fake:Block.forward", root=str(tmp_path))

    base = fingerprint_of("class Block:\n    def forward(self, x):\n        return x + 1\n")
    assert base is not None and len(base) == 16
    assert fingerprint_of('class Block:\n    def forward(self, x):\n        """Doc."""\n        # comment\n\n'
                          "        return (x\n                + 1)\n") == base
    assert fingerprint_of("class Block:\n    def forward(self, x):\n        return x + 2\n") != base
    assert fingerprint_of("class Block:\n    @staticmethod\n    def forward(self, x):\n        return x + 1\n") != base
    assert fingerprint_of("class Block:\n    def other(self, x):\n        return x + 1\n") is None
    assert compat.fingerprint("fake_module_that_does_not_exist:f", root=str(tmp_path)) is None


def test_a_changed_attention_forward_skips_exactly_that_family(monkeypatch):
    change_one_line(monkeypatch, f"{CLIP}:CLIPAttention.forward")
    clip = build("clip").eval()
    with pytest.warns(UserWarning, match="CLIPAttention.forward"):
        handle = mmkernels.patch(clip)
    skipped = {(s.path, s.kind): s.reason for s in handle.skipped}
    assert sorted(skipped) == [("text_model.encoder.layers.0.self_attn", "attention"),
                               ("vision_model.encoder.layers.0.self_attn", "attention")]
    assert all("modeling_clip.CLIPAttention.forward" in r and "5.25.0" in r for r in skipped.values())
    assert [(r.path, r.kind) for r in handle.records] == [("", "loss")]  # the loss mirrors other code
    assert clip.config._attn_implementation != "mmkernels"
    handle.undo()
    with pytest.raises(StrictPatchError, match="CLIPAttention.forward"):
        mmkernels.patch(clip, strict=True)
    # Other families in the same process are untouched.
    lxmert = LxmertModel(LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=12, visual_pos_dim=4))
    assert len(mmkernels.patch(lxmert).records) == 5 and not mmkernels.unpatch(clip)
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    assert len(mmkernels.patch(clip).records) == 4


def test_a_changed_loss_forward_leaves_the_loss_and_names_it(monkeypatch):
    change_one_line(monkeypatch, f"{CLIP}:CLIPModel.forward")
    handle = mmkernels.patch(build("clip").eval())
    assert [(s.path, s.kind) for s in handle.skipped] == [("", "loss")]
    assert "modeling_clip.CLIPModel.forward" in handle.skipped[0].reason
    assert {r.kind for r in handle.records} == {"attention"}


def test_a_changed_fusion_attention_is_left_as_it_is(monkeypatch):
    change_one_line(monkeypatch, "transformers.models.lxmert.modeling_lxmert:LxmertAttention.__init__")
    model = LxmertModel(LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=12, visual_pos_dim=4))
    handle = mmkernels.patch(model)
    assert not handle.records and len(handle.skipped) == 5
    assert all("modeling_lxmert.LxmertAttention.__init__" in s.reason for s in handle.skipped)


def test_a_changed_pooling_head_leaves_its_multihead_attention_unpatched(monkeypatch):
    """Patched as a plain nn.MultiheadAttention the head's attention would fall back at every call
    (the head asks for the weights): it is left as it is and listed, not patched uselessly."""
    change_one_line(monkeypatch, "transformers.models.siglip.modeling_siglip:SiglipMultiheadAttentionPoolingHead.forward")
    model = build("siglip").eval()
    handle = mmkernels.patch(model)
    skipped = {s.path: s.reason for s in handle.skipped}
    assert list(skipped) == ["vision_model.head.attention"]
    assert "SiglipMultiheadAttentionPoolingHead.forward" in skipped["vision_model.head.attention"]
    assert "forward" not in model.vision_model.head.attention.__dict__
    assert {r.path for r in handle.records} >= {"", "text_model.encoder.layers.0.self_attn"}


def test_a_gone_definition_is_named_as_gone(monkeypatch):
    real = compat._module_source
    source = real(CLIP).replace("def _get_vector_norm(", "def _renamed_vector_norm(")
    monkeypatch.setattr(compat, "_module_source", lambda m, root=None: source if m == CLIP else real(m, root))
    compat.clear_cache()
    handle = mmkernels.patch(build("clip").eval(), attention=False)
    assert "modeling_clip._get_vector_norm (gone)" in handle.skipped[0].reason


def test_the_check_command_names_the_changed_patches(monkeypatch, capsys):
    change_one_line(monkeypatch, f"{CLIP}:CLIPAttention.forward")
    assert compat.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "CHANGED  attention: clip: modeling_clip.CLIPAttention.forward" in out
    assert "known    loss: CLIPModel" in out


def test_open_clip_scaled_cosine_attention_is_not_a_loss():
    """open_clip's own attention class keeps a logit_scale (None, or a Parameter with scaled cosine
    attention): it is listed as attention left as it is, never as an unpatched loss."""

    class Attention(torch.nn.Module):  # the shape of open_clip.transformer.Attention
        def __init__(self, scaled_cosine):
            super().__init__()
            self.in_proj_weight = torch.nn.Parameter(torch.randn(12, 4))
            self.logit_scale = torch.nn.Parameter(torch.zeros(2, 1, 1)) if scaled_cosine else None

        def forward(self, x):
            return x

    model = torch.nn.Sequential(Attention(False), Attention(True))
    handle = mmkernels.patch(model)
    assert sorted((s.path, s.kind) for s in handle.skipped) == [("0", "attention"), ("1", "attention")]
    handle.undo()
    with pytest.raises(StrictPatchError) as error:
        mmkernels.patch(model, strict=True)
    assert "(loss)" not in str(error.value)
