"""How a pipeline run directory names its per-artifact stage directories: one source for the name the
pipeline writes (`build-int8-ort-cpu`) and the report reads back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8", "dense")  # "dense": the uncompressed FP32 reference


@dataclass(frozen=True)
class ArtifactDir:
    """`<stage>-<precision>-<backend>`: stage build/verify/bench, precision of PRECISIONS, backend name."""

    stage: str
    precision: str
    backend: str

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.precision}-{self.backend}"

    @property
    def kind(self) -> str:
        """`<precision>-<backend>`, shared by an artifact's build, verify and bench directories."""
        return f"{self.precision}-{self.backend}"

    def sibling(self, stage: str) -> ArtifactDir:
        """The same artifact's directory of another stage (verify-int8-x -> bench-int8-x)."""
        return ArtifactDir(stage, self.precision, self.backend)

    def path(self, run_dir: Path) -> Path:
        return run_dir / self.name


def parse_artifact_dir(name: str) -> ArtifactDir:
    """The parts of a directory name the pipeline wrote (ValueError for any other name)."""
    stage, _, rest = name.partition("-")
    precision, _, backend = rest.partition("-")
    if not stage or precision not in PRECISIONS or not backend:
        raise ValueError(f"not a pipeline artifact directory: {name}")
    return ArtifactDir(stage, precision, backend)
