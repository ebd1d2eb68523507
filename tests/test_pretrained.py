"""The pretrained path, without a network: timm loads weights from a local file, the
converted model keeps them and computes the same outputs."""

import timm
import torch

import pfa_fx


def test_timm_pretrained_from_local_file_converts_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=7)
    weights = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), weights)
    model = timm.create_model(
        "resnet10t", pretrained=True, num_classes=7, pretrained_cfg_overlay={"file": str(weights), "num_classes": 7}
    )
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)  # really loaded from the file
    gm = pfa_fx.convert(model.eval(), "pfa", compact=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(gm(x), source.eval()(x))
    # and a checkpoint of the original loads into the converted model by name
    missing, unexpected = gm.load_state_dict(torch.load(weights), strict=False)
    assert unexpected == [] and all(k.startswith("pfa_feedback.") for k in missing)
