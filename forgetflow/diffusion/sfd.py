"""Score Forgetting Distillation (Chen, Zhang, Zhou, ICLR 2025), built on SiD (Zhou et al. 2024).

Three networks of the teacher's architecture, all initialised from the teacher:
teacher score f_phi (frozen), fake score f_psi (tracks the generator's distribution) and the
one-step generator G_theta(z; c) = D_G(b_{t_init} z; c, t_init) (+ EMA). No real image is used.

One iteration = fake-score step, then generator step; t ~ U{t(sigma_min), ..., t(sigma_max) - 1},
x_t = a_t x_g + b_t eps. Keep rows have conditions c of the remaining classes (or retain
prompts); forget rows have a forget condition c_f (class, or prompt naming the concept) and its
override c_o (class, or the same prompt with the concept replaced). Conditions are ids that
a Conditioning turns into the networks' inputs (conditioning.py): the method is written once.

Fake-score step (x_g detached; conditions dropped to the null input with probability
fake_class_dropout, as in the paper's text-to-image setting, so that f_psi keeps an
unconditional score):
    L_psi = E ||eps_psi(x_t; c, t) - eps||^2 + lambda_f E ||eps_psi(x_t^f; c_f, t) - eps||^2
Generator step (f_phi, f_psi frozen; gradients flow through their inputs):
    l_SiD(y_r, y_f, x_g) = sum_pixels (y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f)) / omega,
    omega = sg(mean_pixels |y_r - x_g|) clamped >= omega_min
    L_theta = E_c l_SiD(f_phi(x_t; c), f_psi(x_t; c), G(z; c))
            + lambda_f E l_SiD(f_phi(x_t; c_o), f_psi(x_t; c_f), G(z; c_f))
f_phi is evaluated with guidance teacher_guidance_scale and f_psi with fake_guidance_scale
(the text-to-image setting guides both; the class setting guides only the teacher).
"""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import Tensor
from tqdm.auto import tqdm

from forgetflow import distributed
from forgetflow.checkpoints import CheckpointSink
from forgetflow.compute import autocast, checkpointed, grad_scaler, resolve_device
from forgetflow.config import Params, SFDParams
from forgetflow.diffusion.artifact import (DiffusionVersion, ModelCard, copy_teacher, load_version, save_version,
                                          teacher_dir)
from forgetflow.diffusion.concepts import PromptForget, card_records, lineage_records, merge_prompt_records
from forgetflow.diffusion.conditioning import ClassConditioning, Conditioning
from forgetflow.diffusion.sampling import denoise, generate_one_step, t_for_sigma, vp_coefficients
from forgetflow.diffusion.train_base import TRAINING_LOG, optimizer_step

STATE_FILE = "state.pt"
RESEED_STRIDE = 7919  # a checkpoint resumed on another number of processes reseeds rank r at seed + r + stride * step


@dataclass(frozen=True)
class Stage:
    """`iterations` of `objective`; forget=False: plain SiD over all classes (no forget rows)."""

    iterations: int
    objective: "SFD"
    forget: bool = True


class SFD:
    """The SFD objective: hyperparameters alpha, lambda_f, omega_min and its two losses."""

    name: ClassVar[str] = "sfd"

    def __init__(self, alpha: float, lambda_f: float, omega_min: float):
        self.alpha, self.lambda_f, self.omega_min = alpha, lambda_f, omega_min

    @classmethod
    def from_params(cls, sfd: SFDParams) -> "SFD":
        return cls(alpha=sfd.alpha, lambda_f=sfd.lambda_f, omega_min=sfd.omega_min)

    @classmethod
    def stages(cls, sfd: SFDParams, targets: int) -> list[Stage]:
        """The stages of a run that forgets `targets` classes or concepts (the lineage's included)."""
        return [Stage(sfd.forget_iterations(targets), cls.from_params(sfd))]

    def _keep_plus_forget(self, per_sample: Tensor, forget_mask: Tensor) -> Tensor:
        """E_keep[per_sample] + lambda_f E_forget[per_sample] (a missing part counts 0)."""
        keep, forget = per_sample[~forget_mask], per_sample[forget_mask]
        total = keep.mean() if keep.numel() else per_sample.new_zeros(())
        return total + self.lambda_f * forget.mean() if forget.numel() else total

    def fake_score_loss(self, eps_psi: Tensor, eps: Tensor, forget_mask: Tensor) -> Tensor:
        """L_psi: eps-matching on detached generator samples; forget rows weighted lambda_f."""
        per_sample = (eps_psi.float() - eps).square().flatten(1).mean(dim=1)
        return self._keep_plus_forget(per_sample, forget_mask)

    def sid_loss(self, y_real: Tensor, y_fake: Tensor, x_g: Tensor) -> Tensor:
        """l_SiD per sample [N]; omega is a stop-gradient normaliser."""
        omega = (y_real - x_g).abs().flatten(1).mean(dim=1).clamp(min=self.omega_min).detach()
        diff = y_real - y_fake
        per_pixel = diff * ((y_real - x_g) - self.alpha * diff)
        return per_pixel.flatten(1).sum(dim=1) / omega

    def generator_loss(self, y_real: Tensor, y_fake: Tensor, x_g: Tensor, forget_mask: Tensor) -> Tensor:
        """L_theta: keep rows y_real = f_phi(x_t; c); forget rows y_real = f_phi(x_t; c_o),
        y_fake = f_psi(x_t; c_f)."""
        return self._keep_plus_forget(self.sid_loss(y_real, y_fake, x_g), forget_mask)

    @classmethod
    def unlearn(cls, base_dir: Path, out_dir: Path, forget_pairs: "Forget", params: Params,
                *, device: torch.device | None = None, checkpoints: CheckpointSink | None = None,
                progress: bool = True) -> Path:
        """The method-registry entry point (see methods.py)."""
        return distributed.launch(train_sfd, base_dir, out_dir, forget_pairs, params, compute=params.compute,
                                  device=device, checkpoints=checkpoints, progress=progress, method=cls.name)


class SFDTwoStage(SFD):
    """First plain SiD (lambda_f = 0, all classes) for sid_iterations, then SFD."""

    name: ClassVar[str] = "sfd-two-stage"

    @classmethod
    def stages(cls, sfd: SFDParams, targets: int) -> list[Stage]:
        sid = cls(alpha=sfd.alpha, lambda_f=0.0, omega_min=sfd.omega_min)
        return [Stage(sfd.sid_iterations, sid, forget=False), *super().stages(sfd, targets)]


class SiD(SFD):
    """Plain SiD (lambda_f = 0, all classes) for `iterations`: the distillation baseline of the
    bench, a one-step generator that forgets nothing (its gates fail by design)."""

    name: ClassVar[str] = "sid"

    @classmethod
    def stages(cls, sfd: SFDParams, targets: int) -> list[Stage]:
        return [Stage(sfd.iterations, cls(alpha=sfd.alpha, lambda_f=0.0, omega_min=sfd.omega_min), forget=False)]


SFD_VARIANTS: dict[str, type[SFD]] = {cls.name: cls for cls in (SFD, SFDTwoStage, SiD)}


RANDOM_OVERRIDE = -1  # c_o of a pair whose forget samples are redrawn as a random remaining class


def merge_forget_pairs(previous: list[tuple[int, int]], new: list[tuple[int, int]], num_classes: int) -> dict[int, int]:
    """{c_f: c_o} over previous ∪ new (a new pair replaces an old one for the same c_f);
    c_o may be RANDOM_OVERRIDE."""
    pairs = dict(previous)
    pairs.update({int(f): int(o) for f, o in new})
    for c_f, c_o in pairs.items():
        if not (0 <= c_f < num_classes and (0 <= c_o < num_classes or c_o == RANDOM_OVERRIDE)):
            raise ValueError(f"class out of range in pair ({c_f}, {c_o}); classes are 0..{num_classes - 1}")
        if c_o in pairs:
            raise ValueError(f"override class {c_o} of {c_f} is itself forgotten")
    return pairs


Forget = Union[list[tuple[int, int]], PromptForget]  # class pairs (c_f, c_o), or a prompt model's records


@dataclass(frozen=True)
class ConditionPlan:
    """The condition ids one run draws: `keep` rows, forget ids -> override ids (`pairs`),
    `everything` for a plain-SiD stage; `forgotten` is the new card's record and `identity`
    what a checkpoint must match to be resumed."""

    conditioning: Conditioning
    keep: list[int]
    pairs: dict[int, int]
    everything: list[int]
    forgotten: list[dict]
    identity: dict


def plan_conditions(base: DiffusionVersion, forget: Forget, method: str) -> ConditionPlan:
    """Class model: the classes, minus the lineage's and the request's forget classes as keep
    rows. Prompt model: one prompt table of the retain, forget and override prompts (the
    lineage's forget records included), encoded once by the frozen text encoder."""
    card = base.card
    if card.conditioning != "prompt":
        pairs = merge_forget_pairs(card.forgotten_pairs, list(forget), card.num_classes)
        return ConditionPlan(ClassConditioning(card.null_class), [c for c in range(card.num_classes) if c not in pairs],
                             pairs, list(range(card.num_classes)),
                             [{"forget_class": f, "override_class": o} for f, o in pairs.items()],
                             {"method": method, "forget_pairs": sorted(pairs.items())})
    if not isinstance(forget, PromptForget):
        raise ValueError("a text-to-image model forgets prompts: give a PromptForget, not class pairs")
    recorded = [r for r in card.forgotten if "concept" in r]
    records = merge_prompt_records(lineage_records(recorded, card.vocabulary), forget.forget)
    forget_prompts = [r["forget_prompt"] for r in records]
    retain = [p for p in forget.retain if p not in forget_prompts]
    prompts = list(dict.fromkeys(retain + forget_prompts + [r["override_prompt"] for r in records]))
    cond = base.conditioning(prompts)
    index = {p: i for i, p in enumerate(prompts)}
    pairs = {index[r["forget_prompt"]]: index[r["override_prompt"]] for r in records}
    # a checkpoint (in the store) is matched on a digest: the prompts are request content
    digest = hashlib.sha256(json.dumps({"forget": records, "retain": retain}, sort_keys=True).encode()).hexdigest()
    return ConditionPlan(cond, [index[p] for p in retain], pairs, list(range(len(prompts))),
                         recorded + card_records(forget.forget, forget.salt), {"method": method, "prompts": digest})


class _Batcher:
    """Draws the conditions, noise and timesteps of one iteration from one torch.Generator."""

    def __init__(self, plan: ConditionPlan, sfd: SFDParams, t_range: tuple[int, int],
                 shape: tuple[int, int, int], rng: torch.Generator, device: torch.device, rank: int = 0, ranks: int = 1):
        """Rank `rank` of `ranks` data-parallel processes draws its share of the recipe's batch
        (shares differ by one row at most when the batch does not divide evenly)."""
        self.n_keep, self.n_forget = (n // ranks + (rank < n % ranks) for n in (sfd.batch_remaining, sfd.batch_forget))
        self.rng, self.device, self.sfd, self.t_range = rng, device, sfd, t_range
        self.shape = shape
        self.null = plan.conditioning.null
        self.all = torch.tensor(plan.everything, device=device)
        self.keep = torch.tensor(plan.keep, device=device)
        self.forget = torch.tensor(list(plan.pairs), device=device)
        self.override = torch.tensor(list(plan.pairs.values()), device=device)

    def _pick(self, pool: Tensor, n: int) -> Tensor:
        return pool[torch.randint(len(pool), (n,), generator=self.rng, device=self.device)]

    def labels(self, forget: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(generator/fake labels, teacher labels, forget mask) for one iteration."""
        n_keep, n_forget = self.n_keep, self.n_forget
        if not forget:
            c = self._pick(self.all, n_keep + n_forget)
            return c, c, torch.zeros_like(c, dtype=torch.bool)
        c = self._pick(self.keep, n_keep)
        which = torch.randint(len(self.forget), (n_forget,), generator=self.rng, device=self.device)
        c_f = self.forget[which]
        c_o = self.override[which]
        random = c_o == RANDOM_OVERRIDE
        if random.any():  # drawn only then: a run without random pairs keeps its random stream
            c_o = torch.where(random, self._pick(self.keep, n_forget), c_o)
        mask = torch.cat([torch.zeros_like(c, dtype=torch.bool), torch.ones_like(c_f, dtype=torch.bool)])
        return torch.cat([c, c_f]), torch.cat([c, c_o]), mask

    def drop_labels(self, c: Tensor) -> Tensor:
        """Replace conditions by the null input with probability fake_class_dropout."""
        dropped = torch.rand(len(c), generator=self.rng, device=self.device) < self.sfd.fake_class_dropout
        return torch.where(dropped, torch.full_like(c, self.null), c)

    def noise(self, n: int) -> Tensor:
        return torch.randn((n, *self.shape), generator=self.rng, device=self.device)

    def timesteps(self, n: int) -> Tensor:
        return torch.randint(*self.t_range, (n,), generator=self.rng, device=self.device)


def _noised(scheduler: DDPMScheduler, x_g: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    a_t, b_t = vp_coefficients(scheduler, t)
    return a_t * x_g + b_t * eps


def _save_state(sink: CheckpointSink, step: int, state: dict) -> None:
    with tempfile.TemporaryDirectory(prefix=f"sfd-step-{step}-") as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        (Path(tmp) / "step.json").write_text(json.dumps({"step": step, "run": state["run"]}))
        sink.save(step, Path(tmp))


def train_sfd(
    base_dir: Path,
    out_dir: Path,
    forget_pairs: Forget,
    params: Params,
    *,
    device: torch.device | None = None,
    checkpoints: CheckpointSink | None = None,
    progress: bool = True,
    method: str = "sfd",
) -> Path:
    """Unlearn `forget_pairs` from the version at base_dir (class pairs [(c_f, c_o)], or a
    prompt model's PromptForget); write a one-step version.

    A one-step base (the version distilled at registration, or a chained request's) keeps
    the lineage's pretrained teacher (its `teacher/`) as f_phi and initialises G_theta from its
    `generator/` and f_psi from its `score/`; its previously forgotten pairs stay in the forget
    term, and the recipe is `sfd.from_one_step` (a short forgetting stage) over `sfd`.
    With `checkpoints`, the full state is saved every sfd.checkpoint_every iterations and a
    call resumes from sink.latest(), continuing the same run exactly.
    """
    if method not in SFD_VARIANTS:
        raise ValueError(f"unknown SFD variant {method!r}; known: {sorted(SFD_VARIANTS)}")
    device = device or resolve_device(params.compute)
    base = load_version(base_dir, device)
    sfd = params.diffusion.sfd.for_base(base.card.kind, base.card.conditioning)
    root = teacher_dir(base_dir)
    teacher = base if root == Path(base_dir) else load_version(root, device)
    card, scheduler = base.card, base.scheduler
    plan = plan_conditions(base, forget_pairs, method)
    cond = plan.conditioning
    t_init = t_for_sigma(scheduler, sfd.sigma_init)
    if card.kind == "one-step" and card.t_init != t_init:
        raise ValueError(f"base generator runs at t_init {card.t_init}, "
                         f"params give {t_init} (sigma_init {sfd.sigma_init})")
    t_range = (t_for_sigma(scheduler, sfd.sigma_min), t_for_sigma(scheduler, sfd.sigma_max))
    stages = SFD_VARIANTS[method].stages(sfd, len(plan.forgotten))
    if not plan.pairs and any(s.forget for s in stages):
        raise ValueError("no forget pairs given")
    total = sum(s.iterations for s in stages)
    run_id = plan.identity

    rng = torch.Generator(device).manual_seed(sfd.seed + distributed.rank())  # each rank its own share
    batcher = _Batcher(plan, sfd, t_range, base.sample_shape, rng, device, distributed.rank(),
                       distributed.world_size())
    f_phi = teacher.score.requires_grad_(False).eval()
    f_psi = checkpointed(copy.deepcopy(base.score), params.compute).train()
    G_theta = checkpointed(copy.deepcopy(base.generator if base.generator is not None else base.score),
                           params.compute).requires_grad_(True).train()
    ema = EMAModel(G_theta.parameters(), decay=sfd.ema_decay, update_after_step=sfd.ema_warmup_iterations)
    adam = dict(betas=tuple(sfd.adam_betas), eps=sfd.adam_eps, weight_decay=0.0)
    opt_theta = torch.optim.Adam(G_theta.parameters(), lr=sfd.lr_generator, **adam)
    opt_psi = torch.optim.Adam(f_psi.parameters(), lr=sfd.lr_fake, **adam)
    scaler_theta, scaler_psi = grad_scaler(device, params.compute), grad_scaler(device, params.compute)

    start, history = 0, []
    window = {"loss_fake": 0.0, "loss_generator": 0.0, "n": 0}
    latest = checkpoints.latest() if checkpoints is not None else None
    if latest is not None:
        path = Path(latest[1])
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
        if state["run"] != run_id:
            raise ValueError(f"checkpoint at {path} belongs to run {state['run']}, not {run_id}")
        G_theta.load_state_dict(state["generator"])
        f_psi.load_state_dict(state["fake"])
        ema.load_state_dict(state["ema"])
        opt_theta.load_state_dict(state["opt_generator"])
        opt_psi.load_state_dict(state["opt_fake"])
        scaler_theta.load_state_dict(state["scaler_generator"])
        scaler_psi.load_state_dict(state["scaler_fake"])
        rng_states = state.get("rng_ranks", [state.get("rng")])
        if len(rng_states) == distributed.world_size():
            rng.set_state(rng_states[distributed.rank()].cpu())
        else:  # resumed on another number of processes: a fresh stream per rank, still seeded
            rng.manual_seed(sfd.seed + distributed.rank() + RESEED_STRIDE * state["step"])
        history, window = state["history"], state["window"]
        start = state["step"]

    def generate(labels: Tensor) -> Tensor:
        z = batcher.noise(len(labels))
        return generate_one_step(G_theta, scheduler, z, labels, t_init, 1.0, cond, params.compute)

    began = time.perf_counter()
    stage_ends = torch.tensor([s.iterations for s in stages]).cumsum(0).tolist()
    for k in tqdm(range(start, total), initial=start, total=total, disable=not (progress and distributed.is_main()),
                  desc=method):
        stage_index = next(i for i, end in enumerate(stage_ends) if k < end)
        stage = stages[stage_index]
        c, c_teacher, forget_mask = batcher.labels(stage.forget)

        # fake-score step on detached generator samples
        with torch.no_grad():
            x_g = generate(c)
        t, eps = batcher.timesteps(len(c)), batcher.noise(len(c))
        f_psi.requires_grad_(True)
        with autocast(device, params.compute):
            eps_psi = f_psi(_noised(scheduler, x_g, t, eps), t, **cond.unet_inputs(batcher.drop_labels(c))).sample
        loss_psi = stage.objective.fake_score_loss(eps_psi, eps, forget_mask)
        optimizer_step(loss_psi, opt_psi, scaler_psi, f_psi.parameters(), sfd.grad_clip)

        # generator step: f_phi and f_psi frozen, gradients through their inputs
        f_psi.requires_grad_(False)
        x_g = generate(c)
        t, eps = batcher.timesteps(len(c)), batcher.noise(len(c))
        x_t = _noised(scheduler, x_g, t, eps)
        y_real = denoise(f_phi, scheduler, x_t, t, c_teacher, sfd.teacher_guidance_scale, cond, params.compute)
        y_fake = denoise(f_psi, scheduler, x_t, t, c, sfd.fake_guidance_scale, cond, params.compute)
        loss_theta = stage.objective.generator_loss(y_real, y_fake, x_g, forget_mask)
        optimizer_step(loss_theta, opt_theta, scaler_theta, G_theta.parameters(), sfd.grad_clip)
        ema.step(G_theta.parameters())

        window["loss_fake"] += loss_psi.item()
        window["loss_generator"] += loss_theta.item()
        window["n"] += 1
        step = k + 1
        if step % sfd.log_every == 0 or step == total:
            n = window["n"]
            history.append({"iteration": step, "stage": stage_index,
                            "loss_fake": window["loss_fake"] / n, "loss_generator": window["loss_generator"] / n})
            window = {"loss_fake": 0.0, "loss_generator": 0.0, "n": 0}
        if checkpoints is not None and step % sfd.checkpoint_every == 0 and step < total:
            rng_ranks = distributed.gather(rng.get_state())
            distributed.on_main(_save_state, checkpoints, step, {
                "step": step, "run": run_id, "generator": G_theta.state_dict(), "fake": f_psi.state_dict(),
                "ema": ema.state_dict(), "opt_generator": opt_theta.state_dict(), "opt_fake": opt_psi.state_dict(),
                "scaler_generator": scaler_theta.state_dict(), "scaler_fake": scaler_psi.state_dict(),
                "rng_ranks": rng_ranks, "history": history, "window": window,
            })
    seconds = time.perf_counter() - began

    ema.copy_to(G_theta.parameters())
    # plain SiD (no forget stage) distils and forgets nothing new: it keeps the base's record
    forgotten = plan.forgotten if any(s.forget for s in stages) else card.forgotten
    new_card = ModelCard(**{**card.to_dict(), "kind": "one-step", "guidance_scale": 1.0, "t_init": t_init,
                            "sigma_init": sfd.sigma_init, "forgotten": forgotten, "method": method,
                            "hyperparameters": sfd.model_dump(mode="json")})
    done_here = total - start
    training_log = {
        "method": method, "iterations": total, "resumed_from": start if latest is not None else None,
        "seconds": seconds, "iterations_per_second": done_here / seconds if done_here else None,
        "t_init": t_init, "t_range": list(t_range), "forget_pairs": sorted(plan.pairs.items()),
        "keep": plan.keep, "device": str(device), "processes": distributed.world_size(),
        "history": history,  # rank 0's losses
    }

    def write_version() -> None:
        version = DiffusionVersion(score=f_psi.eval(), generator=G_theta.eval(), scheduler=scheduler, card=new_card)
        save_version(Path(out_dir), version)
        copy_teacher(root, Path(out_dir))
        (Path(out_dir) / TRAINING_LOG).write_text(json.dumps(training_log, indent=2))

    distributed.on_main(write_version)  # the replicas are identical: one writes
    return Path(out_dir)
