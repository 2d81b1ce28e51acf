"""Flatness of a finished run: the local energy of the center and of every replica.

    python -m replica_dist.flatness RUN_DIR [--sigmas 0.01,0.05,0.1,0.2] [--samples 20] [--seed 0] [--force]

Local energy (Pittorino et al. 2021): dE(sigma) = E_z[E_train(w * (1 + sigma z))] - E_train(w),
z ~ N(0, I) over every parameter (buffers such as BatchNorm statistics are left alone).
E_train is the training error (1 - accuracy) for classification and the dataset's training
loss for regression, on the whole training set. The expectation is a mean over `samples`
draws, reported with its standard error. Writes RUN_DIR/flatness.json and the scalars
`flatness/local_energy_sigma_<sigma>[_stderr]` into tb/center/ and tb/replica_<r>/ at the
run's last step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from replica_dist.config import Config, ConfigError
from replica_dist.data import load_dataset
from replica_dist.evaluate import LOSSES
from replica_dist.model import build_model

PROG = "replica_dist.flatness"


def _train_energy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, loss: str) -> float:
    output = model(x)
    if task == "classification":
        return (output.argmax(dim=1) != y).double().mean().item()
    return LOSSES[loss](output, y).item()


@torch.no_grad()
def local_energy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str,
    loss: str,
    sigmas: list[float],
    samples: int,
    generator: torch.Generator,
) -> list[dict]:
    """Monte Carlo local energy of `model` on (x, y), one dict per sigma:
    {"sigma", "local_energy", "stderr", "samples"}. The model's weights and train/eval mode
    are restored afterwards, also when a forward pass fails."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be classification or regression; got {task!r}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a standard error; got {samples}")
    if not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite and >= 0; got {list(sigmas)}")
    params = list(model.parameters())
    originals = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()  # dropout off, BatchNorm on its running statistics: one fixed function of w
    deltas = torch.zeros(samples, len(sigmas), dtype=torch.float64)
    try:
        base = _train_energy(model, x, y, task, loss)
        for s in range(samples):
            # One z per draw, shared by every sigma (common random numbers): the curve over
            # sigma is smooth, and each sigma's result does not depend on the rest of the grid.
            zs = [
                torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device).to(p.device)
                for p in params
            ]
            for k, sigma in enumerate(sigmas):
                if sigma == 0:
                    continue  # the identity perturbation: exactly 0, no evaluation noise
                # Written in place into the very module that is evaluated below, so the forward
                # pass cannot see the unperturbed weights (the bug of evaluating a pristine copy).
                for p, w, z in zip(params, originals, zs):
                    p.copy_(torch.addcmul(w, w, z, value=sigma))
                deltas[s, k] = _train_energy(model, x, y, task, loss) - base
    finally:
        for p, w in zip(params, originals):
            p.copy_(w)
        model.train(was_training)
    means, stderrs = deltas.mean(dim=0), deltas.std(dim=0, correction=1) / math.sqrt(samples)
    return [
        {
            "sigma": float(sigma),
            "local_energy": means[k].item(),
            "stderr": stderrs[k].item(),
            "samples": samples,
        }
        for k, sigma in enumerate(sigmas)
    ]


# ---- command line -------------------------------------------------------------------------


class FlatnessError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _parse_sigmas(text: str) -> list[float]:
    try:
        sigmas = [float(part) for part in text.split(",")]
    except ValueError:
        raise FlatnessError(f"--sigmas must be comma-separated numbers; got {text!r}") from None
    if not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise FlatnessError(f"--sigmas must be finite and >= 0; got {text!r}")
    return sigmas


def _tag(sigma: float) -> str:
    return f"flatness/local_energy_sigma_{sigma:g}"


def _load_run(run_dir: Path) -> tuple[Config, dict, list[Path]]:
    """The run's config, its summary and its weight files, center first."""
    if not run_dir.is_dir():
        raise FlatnessError(f"run directory does not exist: {run_dir}")
    for name in ("config.yaml", "summary.json", "weights/center.pt"):
        if not (run_dir / name).is_file():
            raise FlatnessError(f"{run_dir} is not a finished run: it lacks {name}")
    try:
        cfg = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / "config.yaml"))
        )
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status", "ok") == "stopped":  # weights/ are a former segment's, if any
            raise FlatnessError(
                f"{run_dir} is not a finished run: it was stopped at step {summary.get('step')}"
            )
        world_size, steps = int(summary["world_size"]), int(summary["steps"])
    except (ConfigError, OmegaConfBaseException, ValueError, KeyError, TypeError) as err:
        raise FlatnessError(
            f"{run_dir}: unreadable config.yaml or summary.json ({' '.join(str(err).split())})"
        ) from None
    weights = [run_dir / "weights" / "center.pt"] + [
        run_dir / "weights" / f"replica_{r}.pt" for r in range(world_size)
    ]
    missing = [str(path.relative_to(run_dir)) for path in weights if not path.is_file()]
    if missing:
        raise FlatnessError(f"{run_dir} lacks {', '.join(missing)} (summary.json says {world_size} replicas)")
    return cfg, {"steps": steps, "world_size": world_size}, weights


def _write_scalars(log_dir: Path, results: list[dict], step: int) -> None:
    # Imported here: only the command line needs TensorBoard, not local_energy's users.
    from torch.utils.tensorboard import SummaryWriter

    # A new event file inside the run's existing directory: TensorBoard shows these tags in
    # the same run as the training curves.
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for entry in results:
            writer.add_scalar(_tag(entry["sigma"]), entry["local_energy"], step)
            writer.add_scalar(_tag(entry["sigma"]) + "_stderr", entry["stderr"], step)
    finally:
        writer.close()


def _table(sigmas: list[float], center: list[dict], replicas: list[list[dict]]) -> str:
    lines = [
        f"{'sigma':>8}  {'center':>21}  {f'mean of {len(replicas)} replicas':>21}  {'replica range':>21}"
    ]
    for k, sigma in enumerate(sigmas):
        values = [r[k]["local_energy"] for r in replicas]
        mean = sum(values) / len(values)
        # Monte Carlo standard error of the replicas' mean (their draws are independent estimates).
        stderr = math.sqrt(sum(r[k]["stderr"] ** 2 for r in replicas)) / len(replicas)
        lines.append(
            f"{sigma:>8g}  {center[k]['local_energy']:>10.5f} ± {center[k]['stderr']:<8.5f}"
            f"  {mean:>10.5f} ± {stderr:<8.5f}  {min(values):>10.5f} .. {max(values):<8.5f}"
        )
    return "\n".join(line.rstrip() for line in lines)


def run(run_dir: Path, sigmas: list[float], samples: int, seed: int, force: bool) -> str:
    """Compute, write flatness.json and the TensorBoard scalars; return the table."""
    if samples < 2:
        raise FlatnessError(f"--samples must be >= 2 for a standard error; got {samples}")
    cfg, summary, weights = _load_run(run_dir)
    out = run_dir / "flatness.json"
    if out.exists() and not force:
        raise FlatnessError(f"{out} already exists; pass --force to overwrite it")
    dtype = getattr(torch, cfg.train.dtype)
    try:
        data = load_dataset(cfg.data, cfg.seed, dtype)
        model = build_model(cfg.model, data.input_shape, data.num_outputs, 0).to(dtype)
    except ConfigError as err:
        raise FlatnessError(str(err)) from None
    results = []
    for path in weights:
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError) as err:
            raise FlatnessError(
                f"{path} does not load into the run's model: {str(err).splitlines()[0]}"
            ) from None
        # The same seed for every model: center and replicas see the same z (common random
        # numbers), so their difference is measured with less noise than either value.
        generator = torch.Generator().manual_seed(seed)
        results.append(
            local_energy(model, data.x_train, data.y_train, data.task, data.loss, sigmas, samples, generator)
        )
    center, replicas = results[0], results[1:]
    _write_scalars(run_dir / "tb" / "center", center, summary["steps"])
    for r, replica in enumerate(replicas):
        _write_scalars(run_dir / "tb" / f"replica_{r}", replica, summary["steps"])
    record = {
        "sigmas": sigmas,
        "samples": samples,
        "seed": seed,
        "metric": "train_error" if data.task == "classification" else "train_loss",
        "center": center,
        "replicas": replicas,
    }
    # Written last and whole (temporary file, then rename): its presence means a complete result.
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    return f"local energy ({record['metric']}), {samples} samples, seed {seed}\n" + _table(
        sigmas, center, replicas
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir", type=Path, help="a finished run directory (hydra.run.dir of a training run)"
    )
    parser.add_argument("--sigmas", default="0.01,0.05,0.1,0.2", help="comma-separated relative noise levels")
    parser.add_argument("--samples", type=int, default=20, help="draws of z per sigma (>= 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws of z")
    parser.add_argument("--force", action="store_true", help="overwrite an existing flatness.json")
    args = parser.parse_args(argv)
    try:
        print(run(args.run_dir, _parse_sigmas(args.sigmas), args.samples, args.seed, args.force))
    except FlatnessError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
