"""The README's examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def run_example(heading: str, capsys) -> str:
    """Execute the first python block under ``heading``; return what it printed."""
    section = README.read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, f"README.md ({heading})", "exec"), {})
    return capsys.readouterr().out


def test_models_example_runs(capsys):
    out = run_example("### Models: FCN-32s/16s/8s and U-Net, and your own networks", capsys)
    assert "388 {'score_pool4': 5, 'score_pool3': 9, 'upscore8': 31}" in out
    assert "torch.Size([1, 8, 52, 52])" in out
    assert "Upsample -> UpsampleAdd" in out and "CrossEntropyLoss -> SoftmaxCrossEntropyLoss" in out


def test_training_example_runs(capsys):
    out = run_example("### Train, evaluate, segment", capsys)
    assert "['fw_iou', 'mean_iou', 'per_class_iou']" in out
    assert "(150, 70)" in out
