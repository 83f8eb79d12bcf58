"""``python -m pretrain export ... --format onnx``: the portable graph of a tiny InternImage and a tiny PeLK runs in
onnxruntime (CPU) and matches PyTorch within 1e-4 relative at batch 1 and 3 (dynamic batch, one file); the
custom-op graph keeps one DCNv3 node per call with its attributes (docs/EXPORT.md's contract)."""
from __future__ import annotations

import pytest
import timm
import torch

import pretrain.models  # noqa: F401 - registers the families with timm

pytest.importorskip('onnxruntime', reason="the 'onnx' extra (pip install -e '.[onnx]')")
pytest.importorskip('onnxscript', reason="the 'onnx' extra (pip install -e '.[onnx]')")

IMG = 64
MODELS = {
    'internimage_t': {'channels': 16, 'depths': [1, 1, 2, 1], 'groups': [1, 2, 4, 8]},
    'pelk_t': {'dims': [16, 32, 64, 128], 'depths': [1, 1, 2, 1]},
}


def _weights_file(tmp_path, name: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **MODELS[name]).eval()
    path = tmp_path / f'{name}.pth'
    torch.save({'model': model.state_dict()}, path)
    return model, str(path)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(MODELS))
def test_portable_export_runs_in_onnxruntime(name, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from pretrain.export import main

    model, src = _weights_file(tmp_path, name)
    out = tmp_path / f'{name}.onnx'
    assert main([src, '--format', 'onnx', '--out', str(out), '--img-size', str(IMG), '--model', name,
                 '--model-kwargs', __import__('json').dumps(MODELS[name])]) == 0
    printed = capsys.readouterr().out
    assert 'onnxruntime (CPU) vs PyTorch on random images at batch 1, 3: max relative error' in printed, printed
    graph = onnx.load(str(out))
    assert {n.domain for n in graph.graph.node} <= {'', 'ai.onnx'}, 'a portable graph holds standard ops only'
    assert graph.opset_import[0].version >= 16
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    for batch in (2, 5):  # independent of the export's own check
        x = torch.randn(batch, 3, IMG, IMG)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(['logits'], {'images': x.numpy()})[0])
        assert got.shape == (batch, 10)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.slow
def test_custom_op_export_keeps_one_dcnv3_node_per_call(tmp_path):
    import onnx

    from pretrain.export_onnx import DOMAIN, export_onnx
    from pretrain.ops import DCNv3

    model, _ = _weights_file(tmp_path, 'internimage_t')
    out = tmp_path / 'custom.onnx'
    export_onnx(model, out, IMG, custom_op=True)
    graph = onnx.load(str(out)).graph
    nodes = [n for n in graph.node if n.op_type == 'DCNv3']
    layers = [m for m in model.modules() if isinstance(m, DCNv3)]
    assert len(nodes) == len(layers) == 5 and {n.domain for n in nodes} == {DOMAIN}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    first = layers[0]
    assert attrs == {'kernel_h': 3, 'kernel_w': 3, 'stride_h': 1, 'stride_w': 1, 'pad_h': 1, 'pad_w': 1,
                     'dilation_h': 1, 'dilation_w': 1, 'group': first.group, 'group_channels': first.group_channels,
                     'offset_scale': pytest.approx(first.offset_scale), 'remove_center': 0}
    assert [i for i in graph.input][0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert all(m.backend == 'auto' for m in layers)  # the model is left as it was
