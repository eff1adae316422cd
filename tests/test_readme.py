"""The README's models example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_models_example_runs(capsys):
    text = README.read_text()
    section = text.split("### Models: FCN-32s/16s/8s and U-Net, and your own networks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (models example)", "exec"), {})
    out = capsys.readouterr().out
    assert "388 {'score_pool4': 5, 'score_pool3': 9, 'upscore8': 31}" in out
    assert "torch.Size([1, 8, 52, 52])" in out
    assert "Upsample -> UpsampleAdd" in out and "CrossEntropyLoss -> SoftmaxCrossEntropyLoss" in out


def test_training_example_runs(capsys):
    text = README.read_text()
    section = text.split("### Train, evaluate, segment", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (training example)", "exec"), {})
    out = capsys.readouterr().out
    assert "['fw_iou', 'mean_iou', 'per_class_iou']" in out
    assert "(150, 70)" in out
