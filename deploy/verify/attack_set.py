"""The transfer set verify replays: loading `cstar attackset`'s directory and pairing it with the artifact.

`load_attackset` reads attackset.npz only after checking it against its manifest's sha256, so a
truncated or swapped file is refused, never measured. `check_compatible` refuses a set made for another
dataset, input shape, class list or threat model (eps, norm) than the artifact's before any work: such
a pairing would gate robustness against the wrong question. A set whose fake-quant attacks were crafted
on the twin of another INT8 model is only warned about: its inputs are still valid transfer attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cstar.errors import CstarError
from cstar.manifest import dataset_name, read_manifest, verify_file

if TYPE_CHECKING:
    from deploy.artifact import Artifact

SET_KEYS = ("x_clean", "labels", "ref_logits_clean")


@dataclass
class AttackSet:
    """A loaded, verified transfer set."""

    directory: Path
    manifest: dict[str, Any]
    sha256: str
    x: np.ndarray
    labels: np.ndarray
    ref_clean: np.ndarray
    adv: dict[str, np.ndarray]
    ref_adv: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        """Number of examples in the set."""
        return int(self.labels.shape[0])


def load_attackset(directory: str | Path) -> AttackSet:
    """Read an attackset directory, verifying attackset.npz against its manifest's sha256."""
    manifest = read_manifest(directory, ("attackset",))
    info = manifest.get("set") or {}
    if "file" not in info or "sha256" not in info:
        raise CstarError(f"{directory}/manifest.json has no set.file/set.sha256", "re-run cstar attackset")
    path = verify_file(directory, info["file"], info["sha256"])
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise CstarError(f"{path} is not a readable attack set ({exc})", "re-run cstar attackset") from exc
    missing = [key for key in SET_KEYS if key not in arrays]
    if missing:
        raise CstarError(f"{path} lacks arrays {missing}", "re-run cstar attackset with this version of cstar")
    attacks = sorted(key[len("adv_"):] for key in arrays if key.startswith("adv_"))
    return AttackSet(
        directory=Path(directory), manifest=manifest, sha256=info["sha256"],
        x=arrays["x_clean"].astype(np.float32, copy=False), labels=arrays["labels"].astype(np.int64, copy=False),
        ref_clean=arrays["ref_logits_clean"],
        adv={a: arrays[f"adv_{a}"].astype(np.float32, copy=False) for a in attacks},
        ref_adv={a: arrays[f"ref_logits_{a}"] for a in attacks if f"ref_logits_{a}" in arrays},
    )


def check_compatible(artifact: Artifact, attack_set: AttackSet) -> list[str]:
    """Raise on dataset/shape/class mismatches between artifact and set; return warnings (eps)."""
    set_manifest = attack_set.manifest
    a_name, s_name = dataset_name(artifact.manifest.get("dataset")), dataset_name(set_manifest.get("dataset"))
    if a_name and s_name and a_name != s_name:
        raise CstarError(f"the attack set is for dataset '{s_name}', the artifact for '{a_name}'",
                         "craft the set from the reference of this artifact (cstar attackset --reference ...)")
    shape = tuple(int(d) for d in artifact.input_shape)
    if tuple(attack_set.x.shape[1:]) != shape:
        raise CstarError(f"the attack set's inputs are {tuple(attack_set.x.shape[1:])}, the artifact takes {shape}",
                         "craft the set at the artifact's input size")
    classes = list(artifact.classes or [])
    set_classes = list(set_manifest.get("classes") or [])
    if classes and set_classes and classes != set_classes:
        raise CstarError("the attack set and the artifact have different class lists",
                         "craft the set from the reference of this artifact")
    check_threat_model(artifact, attack_set)
    return twin_warnings(artifact, attack_set)


def twin_warnings(artifact: Artifact, attack_set: AttackSet) -> list[str]:
    """A set whose *_fq attacks were crafted on the fake-quant twin of another INT8 model than this one."""
    twin = (attack_set.manifest.get("set") or {}).get("quantized")
    if not isinstance(twin, dict) or not twin.get("onnx_sha256"):
        return []
    hashes = {str(entry.get("sha256")) for entry in artifact.manifest.get("inputs", []) if isinstance(entry, dict)}
    hashes.add(artifact.sha256)
    if twin["onnx_sha256"] in hashes:
        return []
    return [f"the attack set's fake-quant sets ({', '.join(twin.get('attacks', []))}) were crafted on the twin of "
            f"another INT8 model (sha256 {str(twin['onnx_sha256'])[:12]}), not this artifact: they are transfer "
            "attacks here"]


def check_threat_model(artifact: Artifact, attack_set: AttackSet) -> None:
    """Refuse a set crafted for another threat model (eps or norm) than the artifact's manifest records.

    A mismatch is a wrong pairing of inputs, like another dataset: verify would gate robustness at a
    radius nobody asked for (a set at eps 5 "passes" any model), so it is an error before any work.
    """
    set_eps, art_eps = attack_set.manifest.get("eps"), artifact.eps
    set_norm, art_norm = attack_set.manifest.get("norm"), artifact.norm
    fix = ("craft the set at the artifact's threat model: cstar attackset --reference REF_DIR --data DATA "
           "(its default eps and norm are the reference's)")
    if set_eps is None:
        return
    if isinstance(set_eps, bool) or not isinstance(set_eps, (int, float)) or not math.isfinite(set_eps):
        raise CstarError(f"{attack_set.directory}/manifest.json records no valid eps ({set_eps!r})", fix)
    if art_eps is not None and abs(float(set_eps) - float(art_eps)) > 1e-6 * max(1.0, abs(float(art_eps))):
        raise CstarError(f"the attack set was crafted at eps={set_eps:g}, the artifact's threat model is "
                         f"eps={art_eps:g} ({artifact.directory}/manifest.json)", fix)
    if set_norm is not None and art_norm is not None and str(set_norm) != str(art_norm):
        raise CstarError(f"the attack set uses norm {set_norm}, the artifact's threat model is norm {art_norm}", fix)


def threat_model(artifact: Artifact, attack_set: AttackSet) -> tuple[float, str]:
    """(eps, norm) verify attacks at: the set's, else the artifact's (eps 0, norm linf when neither says)."""
    eps = float(attack_set.manifest.get("eps", artifact.eps or 0.0))
    norm = str(attack_set.manifest.get("norm", artifact.norm or "linf"))
    return eps, norm
