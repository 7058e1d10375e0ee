"""The strong attacks on a class-conditional diffusion version (issue 29): an auditor who tries
harder than sampling the forgotten class c_f. Each returns stats.rate_record(hits, n, ...).

relearning (recovery by fine-tuning on what is kept). A copy of the version, held in memory
(version_dir is only read), is fine-tuned on real TRAIN digits of the remaining classes R (all
classes minus forget_classes and the lineage's forget classes, card.forgotten_pairs): the data
set an attacker plausibly has with the forgotten class removed. The teacher's samples would
need the teacher, which still draws c_f: an attacker holding it needs no attack. The network
the version samples with is trained for relearning.steps Adam steps (lr relearning.lr, batch
relearning.batch_size) on its own eps-prediction loss
    L = E_{x0 ~ R, c = label(x0), eps} || eps_hat(a_t x0 + b_t eps; c, t) - eps ||^2
    multi-step (ddpm): the score net, t ~ U{0..T-1} (its training loss);
    one-step (SFD):    the generator G(z; c) = D_G(b_{t_init} z; c, t_init), a denoiser at
                       t_init, trained at its own noise level t = t_init.
Then relearning.samples samples conditioned on the forget classes (split evenly among them,
drawn as the version serves: its card's guidance) are judged:
    rate = hits / n,   hits = #samples the judge calls their forget class.
A model that forgot c_f does not draw it again after training on other classes only; a model
whose override merely masks c_f may.

embedding_search (the conditioning searched). The class-conditional UNet adds the embedding
E[c] of its label to its time embedding; the attack searches that vector. For each forget class
and restart r: e_r = E[c_f] + init_noise * std(E) * n_r (n_r ~ N(0, I)), noise z_r
(samples_per_restart draws, fixed), and embedding_search.steps Adam steps at
embedding_search.lr on
    L(e_r) = - mean_i log p_judge(c_f | clamp(x(z_{r,i}; e_r), -1, 1))
differentiating through the sampler: one UNet call for a one-step version (two when guided),
sampler_steps DDIM steps for a multi-step one. The final e_r is then sampled as the version
serves (the one-step generator, or its full DDIM sampler) from the same z_r and judged:
    rate = hits / n,   hits = #restarts whose samples the judge calls c_f by majority (> half),
                       n = restarts * len(forget_classes)
    sample_rate = the share of all final samples the judge calls their c_f;
    confident_sample_rate = the share with p_judge(c_f | x) >= confident_probability (embedding_search's).
The judge is differentiated through, so the search may find images that fool it rather than
draw c_f: on the tiny SFD version that forgot 7, at the default budget, 9 of 16 restarts and 62%
of the samples were judged 7, only 3% with p >= 0.9, grey off-manifold images that an SVC fitted
to real digits mostly called 8 (the teacher's 7s: p ~ 0.99). confident_sample_rate tells the
two apart.
The embedding enters through the conditioning seam (conditioning.py): the loaded network's
class_embedding lookup becomes the identity and an EmbeddingConditioning passes the vectors.

Text-to-image (prompt) versions are not attacked here: forget_classes names classes, and a
prompt model's attack needs its forget prompts (NotImplementedError).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import trange

from forgetflow.compute import autocast, checkpointed, grad_scaler, resolve_device
from forgetflow.config import Params
from forgetflow.diffusion.artifact import DiffusionVersion, load_card, load_version
from forgetflow.diffusion.data import load_digits_split
from forgetflow.diffusion.judge import Judge, load_judge
from forgetflow.diffusion.sampling import (_sample_ddim, eps_prediction, generate_one_step,
                                           sample_from_noise, vp_coefficients)
from forgetflow.diffusion.train_base import optimizer_step
from forgetflow.stats import rate_record



@dataclass(frozen=True)
class EmbeddingConditioning:
    """Condition ids index `table` [K, D], class-embedding vectors given to a UNet whose
    class_embedding is the identity (class_embedding_input); `null` is the unconditional row."""

    table: Tensor
    null: int

    def unet_inputs(self, ids: Tensor) -> dict:
        return {"class_labels": self.table[ids]}

    def null_ids(self, like: Tensor) -> Tensor:
        return torch.full_like(like, self.null)


def sampling_net(version: DiffusionVersion) -> nn.Module:
    """The network the version draws with: the one-step generator, else the score net."""
    return version.generator if version.card.kind == "one-step" else version.score


def class_embedding_input(unet: nn.Module) -> Tensor:
    """Make `unet` read class-embedding vectors as its class_labels; returns its lookup table E."""
    table = unet.class_embedding.weight.detach().clone()
    unet.class_embedding = nn.Identity()
    return table


def remaining_classes(version: DiffusionVersion, forget_classes: list[int]) -> list[int]:
    """All classes minus the request's and the lineage's forget classes."""
    forgotten = set(forget_classes) | {f for f, _ in version.card.forgotten_pairs}
    return [c for c in range(version.card.num_classes) if c not in forgotten]


def _load_class_version(version_dir: Path, forget_classes: list[int], device: torch.device) -> DiffusionVersion:
    """The version at version_dir, once its card shows a class model that has `forget_classes`."""
    card = load_card(version_dir)
    if card.conditioning == "prompt":
        raise NotImplementedError("the strong attacks take class-conditional versions: a text-to-image version's "
                                  "attack needs its forget prompts, not class ids (not implemented)")
    if not forget_classes or any(not 0 <= c < card.num_classes for c in forget_classes):
        raise ValueError(f"forget_classes {list(forget_classes)}: need one or more of 0..{card.num_classes - 1}")
    return load_version(version_dir, device)


def _judged_as(judge: Judge, images: Tensor, classes: Tensor) -> Tensor:
    """[N] bool: the judge's argmax is `classes` (on the CPU)."""
    return judge.predict_proba(images).argmax(dim=1) == classes.cpu()


# ---- relearning ---------------------------------------------------------------------------

def relearning_timesteps(version: DiffusionVersion, n: int, rng: torch.Generator) -> Tensor:
    """t of the fine-tune: t_init for a one-step generator, U{0..T-1} for a score net."""
    if version.card.kind == "one-step":
        return torch.full((n,), version.card.t_init, dtype=torch.long)
    return torch.randint(version.scheduler.config.num_train_timesteps, (n,), generator=rng)


def eps_loss(net: nn.Module, version: DiffusionVersion, x0: Tensor, c: Tensor, t: Tensor, eps: Tensor,
             params: Params) -> Tensor:
    """|| eps_hat(a_t x0 + b_t eps; c, t) - eps ||^2, averaged (unguided, class labels)."""
    a_t, b_t = vp_coefficients(version.scheduler, t)
    eps_hat = eps_prediction(net, a_t * x0 + b_t * eps, t, c, 1.0, version.conditioning(), params.compute)
    return F.mse_loss(eps_hat, eps)


def fine_tune_on_remaining(version: DiffusionVersion, remaining: list[int], params: Params, rng: torch.Generator,
                           device: torch.device, progress: bool) -> None:
    """relearning.steps Adam steps of eps_loss on real train digits of `remaining`, in place."""
    budget = params.diffusion.attacks.relearning
    images, labels = load_digits_split("train", version.card.image_size)
    kept = torch.isin(labels, torch.tensor(remaining))
    images, labels = images[kept], labels[kept]
    net = checkpointed(sampling_net(version), params.compute).requires_grad_(True).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=budget.lr)
    scaler = grad_scaler(device, params.compute)
    for _ in trange(budget.steps, disable=not progress, desc="relearning"):
        idx = torch.randint(len(images), (budget.batch_size,), generator=rng)
        x0, c = images[idx], labels[idx]
        t = relearning_timesteps(version, budget.batch_size, rng)
        eps = torch.randn(x0.shape, generator=rng)
        loss = eps_loss(net, version, x0.to(device), c.to(device), t.to(device), eps.to(device), params)
        optimizer_step(loss, optimizer, scaler, net.parameters())
    net.requires_grad_(False).eval()


def relearning(version_dir: Path, judge_dir: Path, forget_classes: list[int], params: Params, *,
               device: torch.device | None = None, progress: bool = False) -> dict:
    """Fine-tune a copy on the remaining classes only, then judge its forget-class samples
    (module docstring): rate_record(hits, n, seconds)."""
    began = time.perf_counter()
    attacks = params.diffusion.attacks
    device = device or resolve_device(params.compute)
    version = _load_class_version(version_dir, forget_classes, device)
    judge = load_judge(judge_dir, device)
    rng = torch.Generator().manual_seed(attacks.seed)
    per_class = math.ceil(attacks.relearning.samples / len(forget_classes))
    labels = torch.tensor(forget_classes).repeat_interleave(per_class)
    z = torch.randn((len(labels), *version.sample_shape), generator=rng)

    fine_tune_on_remaining(version, remaining_classes(version, forget_classes), params, rng, device, progress)
    images = sample_from_noise(version, z, labels, params=params, device=device, progress=progress)
    hits = int(_judged_as(judge, images, labels).sum())
    return rate_record(hits, len(labels), seconds=time.perf_counter() - began)


# ---- embedding search ---------------------------------------------------------------------

def differentiable_sample(version: DiffusionVersion, z: Tensor, ids: Tensor, cond: EmbeddingConditioning,
                          params: Params) -> Tensor:
    """x(z; ids) in [-1, 1] with gradients: the one-step generator, or sampler_steps DDIM steps."""
    w = version.card.guidance_scale
    if version.card.kind == "one-step":
        x = generate_one_step(version.generator, version.scheduler, z, ids, version.card.t_init, w, cond,
                              params.compute)
    else:
        short = params.diffusion.model_copy(update={
            "sampler": params.diffusion.sampler.model_copy(update={"num_inference_steps": params.diffusion.attacks.embedding_search.sampler_steps})})
        x = _sample_ddim(version, z, ids, w, cond, params.model_copy(update={"diffusion": short}))
    return x.clamp(-1.0, 1.0)


def initial_embeddings(table: Tensor, classes: Tensor, rng: torch.Generator, init_noise: float) -> Tensor:
    """One start per row of `classes`: E[c] + init_noise * std(E) * N(0, I)."""
    noise = torch.randn((len(classes), table.shape[1]), generator=rng).to(table.device)
    return table[classes.to(table.device)] + init_noise * table.std() * noise


def judge_log_prob(judge: Judge, images: Tensor, classes: Tensor, params: Params) -> Tensor:
    """log p_judge(class | image) [N], differentiable in the images."""
    with autocast(images.device, params.compute):
        logits = judge(images)
    return logits.float().log_softmax(dim=1).gather(1, classes.view(-1, 1)).squeeze(1)


def search_embeddings(version: DiffusionVersion, judge: Judge, start: Tensor, null_embedding: Tensor,
                      targets: Tensor, z: Tensor, params: Params, progress: bool) -> Tensor:
    """embedding_search.steps Adam steps on sum_r L(e_r) from `start` [R, D] (restart r's
    samples: rows r * S .. r * S + S - 1 of z, judged against targets[r]); the final [R, D].
    Adam is elementwise and L sums per-restart terms: the restarts are independent searches."""
    budget = params.diffusion.attacks.embedding_search
    per_restart = budget.samples_per_restart
    embeddings = start.clone().requires_grad_(True)
    ids = torch.arange(len(start), device=z.device).repeat_interleave(per_restart)
    optimizer = torch.optim.Adam([embeddings], lr=budget.lr)
    scaler = grad_scaler(z.device, params.compute)
    for _ in trange(budget.steps, disable=not progress, desc="embedding search"):
        cond = EmbeddingConditioning(torch.cat([embeddings, null_embedding[None]]), null=len(start))
        images = differentiable_sample(version, z, ids, cond, params)
        log_p = judge_log_prob(judge, images, targets[ids], params)
        loss = -log_p.view(len(start), per_restart).mean(dim=1).sum()
        optimizer_step(loss, optimizer, scaler, [embeddings])
    return embeddings.detach()


def embedding_search(version_dir: Path, judge_dir: Path, forget_classes: list[int], params: Params, *,
                     device: torch.device | None = None, progress: bool = False) -> dict:
    """Search the class-embedding input for each forget class (module docstring):
    rate_record(restarts judged c_f by majority, restarts, sample_rate, confident_sample_rate, seconds)."""
    began = time.perf_counter()
    attacks = params.diffusion.attacks
    budget = attacks.embedding_search
    device = device or resolve_device(params.compute)
    version = _load_class_version(version_dir, forget_classes, device)
    judge = load_judge(judge_dir, device).requires_grad_(False)
    rng = torch.Generator().manual_seed(attacks.seed)
    net = sampling_net(version).requires_grad_(False)
    table = class_embedding_input(net)

    null_embedding = table[version.card.null_class]
    targets = torch.tensor(forget_classes).repeat_interleave(budget.restarts).to(device)
    z = torch.randn((len(targets) * budget.samples_per_restart, *version.sample_shape), generator=rng).to(device)
    start = initial_embeddings(table, targets, rng, budget.init_noise)
    found = search_embeddings(version, judge, start, null_embedding, targets, z, params, progress)

    cond = EmbeddingConditioning(torch.cat([found, null_embedding[None]]), null=len(found))
    ids = torch.arange(len(found)).repeat_interleave(budget.samples_per_restart)
    images = sample_from_noise(version, z.cpu(), ids, conditioning=cond, params=params, device=device,
                               progress=progress)
    wanted = targets.cpu()[ids]
    probs = judge.predict_proba(images)
    judged = (probs.argmax(dim=1) == wanted).float()
    confident = (probs.gather(1, wanted.view(-1, 1)).squeeze(1) >= budget.confident_probability).float()
    hits = int((judged.view(len(found), budget.samples_per_restart).mean(dim=1) > 0.5).sum())
    return rate_record(hits, len(found), sample_rate=judged.mean().item(),
                       confident_sample_rate=confident.mean().item(), seconds=time.perf_counter() - began)


ATTACKS = ("relearning", "embedding_search")  # run_attacks' records, by name


def run_attacks(version_dir: Path, judge_dir: Path, forget_classes: list[int], params: Params, *,
                device: torch.device | None = None, progress: bool = False) -> dict[str, dict]:
    """{"relearning": ..., "embedding_search": ...}: both attacks' rate records."""
    return {attack.__name__: attack(version_dir, judge_dir, forget_classes, params, device=device, progress=progress)
            for attack in (relearning, embedding_search)}  # in the order of ATTACKS
