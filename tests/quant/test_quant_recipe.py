"""Recipe loading, resolution and validation errors."""
import pytest
import torch
import yaml

from fairseq_qasr.quant import RecipeError, load_recipe, quantize_model
from fairseq_qasr.quant.recipe import RECIPE_DIR

from quant_toy import ToyBlock, toy_inputs

SHIPPED = ["w8a8", "w4a8", "w2a8", "headon_w8", "headon_w4", "headon_w2"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load(name):
    r = load_recipe(name)
    assert r.version == 1 and r.name == name
    bits = int(name[-3] if name.startswith("w") else name[-1])
    assert r.config_for("enc.fc1", "linear").weight.bits == bits


def test_headon_is_same_bits_everywhere_minmax():
    r = load_recipe("headon_w4")
    for op in ("linear", "softmax", "layer_norm", "add", "matmul"):
        c = r.config_for("x.y", op)
        assert c.input.bits == c.weight.bits == 4
        assert c.input.observer == c.weight.observer == "minmax"
        assert c.weight.granularity == "tensor" and c.output is None


def base():
    return yaml.safe_load((RECIPE_DIR / "w8a8.yaml").read_text())


def write(tmp_path, d):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_overrides_by_glob_regex_and_op_type(tmp_path):
    d = base()
    d["overrides"] = {"decoder.layers.*.self_attn.softmax": {"bits": 6, "signed": False},
                      r"re:encoder\.layers\.[01]\.fc\d": {"weight": {"bits": 4}}}
    r = load_recipe(write(tmp_path, d))
    c = r.config_for("decoder.layers.3.self_attn.softmax_0", "softmax")
    assert c.input.bits == 6 and c.output.bits == 6 and not c.output.signed
    assert r.config_for("encoder.layers.1.fc2", "linear").weight.bits == 4
    assert r.config_for("encoder.layers.2.fc2", "linear").weight.bits == 8


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(colour=1), "colour"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["defaults"]["weight"].update(bits=9), "bits"),
    (lambda d: d["defaults"]["input"].update(bitz=8), "bitz"),
    (lambda d: d["ops"].update(conv3d={"bits": 8}), "conv3d"),
    (lambda d: d.update(overrides={"a.*": {"weight": {"bits": 17}}}), "bits"),
    (lambda d: d.update(overrides={"a.*": {"input": None}}), "input"),
    (lambda d: d.update(overrides={"re:(": {"bits": 8}}), "regex"),
])
def test_validation_errors_name_field_and_file(tmp_path, mutate, needle):
    d = base()
    mutate(d)
    p = write(tmp_path, d)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_pattern_matching_nothing_is_an_error(tmp_path):
    d = base()
    d["overrides"] = {"decoder.*.softmax": {"bits": 8}}
    p = write(tmp_path, d)
    with pytest.raises(RecipeError, match=r"decoder\.\*\.softmax"):
        quantize_model(ToyBlock().eval(), p, example_inputs=toy_inputs())


def test_pattern_on_routed_op_is_applied(tmp_path):
    d = base()
    d["overrides"] = {"softmax": {"output": {"bits": 4, "signed": False}}}
    m = quantize_model(ToyBlock().eval(), write(tmp_path, d), example_inputs=toy_inputs())
    assert m.softmax_0.out_q.spec.bits == 4


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="w8a8"):
        load_recipe("w9a9")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_quantize_and_audit_clean(name):
    from fairseq_qasr.quant import calibrate
    from fairseq_qasr.quant.audit import audit

    torch.manual_seed(0)
    m = ToyBlock().eval()
    inp = toy_inputs()
    quantize_model(m, name, example_inputs=inp)
    calibrate(m, [inp])
    r = audit(m, [inp])
    assert r.ok, r.table()
    wbits = load_recipe(name).defaults.weight.bits
    assert r.rows[("linear", "addmm")].bits[2] == {wbits}
