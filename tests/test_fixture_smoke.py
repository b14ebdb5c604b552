"""The shared fixtures produce usable checkpoints (other tests rely on these floors)."""

from cstar.checkpoint import load_checkpoint
from cstar.manifest import read_manifest


def test_fixture_checkpoints_are_accurate(robust_digits_dir, standard_digits_dir):
    for directory in (robust_digits_dir, standard_digits_dir):
        manifest = read_manifest(directory, ["train"])
        assert manifest["metrics"]["clean_acc"] >= 0.85
        model, _ = load_checkpoint(directory)
        assert not model.training
