"""TDGAN: learning one conditional generator from data centres in sequence with temporary discriminators (Qu et
al., ECCV 2020), and its baselines, as algorithms of the shared engine.

Stage t of the run is round t: the generator (the run's model, label map -> image) visits centre t, whose images
never leave it. A temporary PatchGAN discriminator, new at this centre, is trained against the generator there and
discarded when the stage ends. The generator minimises the digesting loss on the centre's pairs and, from the
second stage on, the reminding loss on the label maps of the centres visited before (label maps, unlike images,
are available to the generator, as in the paper and its predecessor AsynDGAN):

    L_G = lambda_G * [ GAN(D_t(s, G(s))) + lambda_L1 * |G(s) - x|_1 + lambda_P * P(G(s), x)           (digesting)
                       + sum_{i < t} ( lambda_rem * |G(s_i) - G_{t-1}(s_i)|_1
                                       + lambda_remP * P(G(s_i), G_{t-1}(s_i)) ) ]                    (reminding)
    L_D = lambda_D * [ GAN(D_t(s, x)) = real + GAN(D_t(s, G(s))) = fake ]

with GAN the binary cross-entropy on the patch logits (pix2pix's `vanilla` mode), G_{t-1} the generator as it
left the previous stage, frozen, and P the perceptual loss of the official `models/perception_loss.py`
(`common.models.perceptual.perceptual_loss`): the mean squared difference of ImageNet VGG-16 activations after relu1_2,
relu2_2, relu3_3 and relu4_3, averaged over the four layers, of images in [-1, 1] as they are (no ImageNet
normalisation); VGG-16 is frozen and in eval mode. The official scripts' weights: lambda_L1 = 100, lambda_P = 10,
lambda_rem = 100, lambda_remP = 10, lambda_G = 0.1, lambda_D = 0.05; Adam (lr 2e-4, beta1 0.5) for both networks.
Parameters: `l1`, `perceptual`, `reminding`, `reminding_perceptual`; the VGG-16 weights are torchvision's vgg16
state dict in the file `perceptual_weights` under data_root, read only when a perceptual weight is non-zero (the
offline scales have no ImageNet weights: their perceptual weights are 0, a listed deviation).

- `tdgan`: as above. `reminding: 0` is **sequential fine-tuning** (the generator forgets earlier centres); on a
  partition that pools every centre into one client it is **joint learning** (pix2pix on all the real data).
- `centre: k`: a **local GAN**, trained at centre k alone (its own data, one stage of the same length); the
  segmenter still trains on its images of every centre's label maps, so the row shows what one centre's GAN
  knows of the others' appearance.
- `real_data`: no generator at all; the downstream segmenter trains on the real images of every centre: the upper
  bound of what synthetic data can give (this paper's ceiling).

Evaluation after every stage is the paper's downstream task: a segmenter (U-Net) is trained on the generator's
images of the training label maps of every centre and tested on each centre's real held-out images (Dice and HD95
of the nucleus class per centre; `test_accuracy` is the mean Dice). The generator's L1 to the real image of each
centre's held-out label maps (`centre_l1`) measures what it still knows of each centre: forgetting is its rise on
earlier centres. Per-centre metrics are lists in centre order; `generated` holds the image of each centre's first
test label map (8-bit RGB) after every stage, for the report's figure.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.engine import sub_seed
from common.models.gan import PatchDiscriminator
from common.models.perceptual import VGG16_FILE, load_vgg16_features, perceptual_loss


def to_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> [-1, 1], the generator's output range."""
    return 2 * x - 1


def coded(maps: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Label maps (N, S, H, W) times one code per map (N,)."""
    return maps * codes.view(-1, *([1] * (maps.dim() - 1)))


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """pix2pix's vanilla GAN loss: binary cross-entropy of every patch logit against 1 (real) or 0 (fake)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def reminding_terms(generator: torch.nn.Module, previous: torch.nn.Module | None, earlier_maps: list[torch.Tensor],
                    features: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, perceptual) summed over earlier centres: the mean |G(s_i) - G_{t-1}(s_i)| and, with VGG-16 `features`,
    the perceptual loss between G(s_i) and G_{t-1}(s_i), on a batch s_i of each one's label maps (the perceptual
    term is 0 without `features`); both zero at the first stage (no earlier centre) and whenever G equals
    G_{t-1}."""
    l1, perceptual = torch.zeros(()), torch.zeros(())
    if previous is None:
        return l1, perceptual
    for maps in earlier_maps:
        with torch.no_grad():
            target = previous(maps)
        fake = generator(maps)
        l1 = l1 + F.l1_loss(fake, target)
        if features is not None:
            perceptual = perceptual + perceptual_loss(features, fake, target)
    return l1, perceptual


def reminding_loss(generator: torch.nn.Module, previous: torch.nn.Module | None,
                   earlier_maps: list[torch.Tensor]) -> torch.Tensor:
    """sum over earlier centres of the mean |G(s_i) - G_{t-1}(s_i)| on a batch s_i of each one's label maps; zero
    at the first stage (no earlier centre) and whenever G equals G_{t-1}."""
    return reminding_terms(generator, previous, earlier_maps)[0]


@register_algorithm("tdgan")
class TDGAN(Algorithm):
    transient = ("ctx", "server_opt", "server_params", "param_names", "vgg")

    def __init__(self, reminding: float = 100.0, l1: float = 100.0, perceptual: float = 0.0,
                 reminding_perceptual: float = 0.0, perceptual_weights: str = VGG16_FILE, lambda_g: float = 0.1,
                 lambda_d: float = 0.05, discriminator_width: int = 64, discriminator_layers: int = 3,
                 beta1: float = 0.5, segmenter: dict | None = None, centre: int | None = None,
                 label_code: bool = False):
        super().__init__()
        self.centre = centre  # a local GAN: every stage visits this centre only
        self.label_code = label_code
        self.reminding, self.l1 = reminding, l1
        self.perceptual, self.reminding_perceptual = perceptual or 0.0, reminding_perceptual or 0.0
        self.perceptual_weights = perceptual_weights
        self.lambda_g, self.lambda_d = lambda_g, lambda_d
        self.d_width, self.d_layers, self.beta1 = discriminator_width, discriminator_layers, beta1
        self.segmenter = segmenter or {}

    def setup(self, ctx):
        super().setup(ctx)
        self.vgg = None  # VGG-16 features of the perceptual loss, read from data_root only when it is used
        if self.perceptual or self.reminding_perceptual:
            self.vgg = load_vgg16_features(Path(ctx.data_root) / self.perceptual_weights).to(ctx.device)
        self.previous: dict | None = None  # the generator's state when the previous stage ended
        self.visited: list[int] = []  # clients (centres) of the stages so far

    def clients_of_round(self, run, round_index: int) -> list[int]:
        """Stage t visits centre t (client t of a one-centre-per-client partition); a pooled partition (one client)
        is visited every stage; a local GAN (`centre`) only ever visits its own centre."""
        if self.centre is not None:
            if not 0 <= self.centre < len(run.ctx.parts):
                raise SuiteError(f"tdgan: centre {self.centre} does not exist (the partition has "
                                 f"{len(run.ctx.parts)} centres, numbered from 0)")
            return [self.centre]
        return [round_index % len(run.ctx.parts)]

    def codes(self, run, domain: torch.Tensor | None) -> torch.Tensor:
        """Per sample, the factor its label map is multiplied by before it enters the generator: with
        `label_code`, (k + 1) / K for centre k of K, as the official loaders give each centre's label map its own
        grey level, so the generator knows which centre's appearance a map calls for; otherwise 1."""
        n = len(run.y) if domain is None else len(domain)
        if not self.label_code or domain is None:
            return torch.ones(n, device=run.y.device)
        return (domain.to(run.y.device).float() + 1) / len(run.ctx.data.domains)

    def train_codes(self, run) -> torch.Tensor:
        return self.codes(run, run.ctx.data.train.domain)

    def train_client(self, run, client: int, round_index: int) -> tuple[float, int]:
        ctx, G = run.ctx, run.ctx.model
        codes = self.train_codes(run)
        torch.manual_seed(sub_seed(run.seed, round_index, client, 0xD15C))  # the temporary discriminator's init
        D = PatchDiscriminator(ctx.data.num_classes + ctx.data.input_shape[0], self.d_width, self.d_layers)
        D = D.to(ctx.device)
        opt_g = torch.optim.Adam(G.parameters(), lr=run.lr, betas=(self.beta1, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), lr=run.lr, betas=(self.beta1, 0.999))
        previous = None
        earlier = [c for c in self.visited if c != client]
        if self.previous is not None and earlier and (self.reminding or self.reminding_perceptual):
            previous = copy.deepcopy(G)
            previous.load_state_dict(self.previous)
            previous.eval()
        gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client))
        maps_of = {c: coded(run.y[ctx.parts[c].to(ctx.device)], codes[ctx.parts[c].to(ctx.device)])
                   for c in earlier}
        G.train()
        total, steps = 0.0, 0
        for x, s, code in run.client_batches(client, run.epochs, gen, also=(codes,)):
            s = coded(s, code)
            real = to_tanh_range(x)
            fake = G(s)
            opt_d.zero_grad(set_to_none=True)
            loss_d = self.lambda_d * (gan_loss(D(s, real), True) + gan_loss(D(s, fake.detach()), False))
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            loss_g = gan_loss(D(s, fake), True) + self.l1 * F.l1_loss(fake, real)
            if self.perceptual:
                loss_g = loss_g + self.perceptual * perceptual_loss(self.vgg, fake, real)
            if previous is not None:
                batches = [m[torch.randint(len(m), (len(s),), generator=gen)] for m in maps_of.values()]
                rem_l1, rem_perceptual = reminding_terms(G, previous, batches,
                                                         self.vgg if self.reminding_perceptual else None)
                loss_g = loss_g + self.reminding * rem_l1
                if self.reminding_perceptual:
                    loss_g = loss_g + self.reminding_perceptual * rem_perceptual
            (self.lambda_g * loss_g).backward()
            opt_g.step()
            total, steps = total + loss_g.item(), steps + 1
        return total / max(steps, 1), steps

    def end_client(self, model, global_state, client, steps):
        self.previous = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if client not in self.visited:
            self.visited.append(client)

    def server_update(self, global_state, client_states, weights, round_index):
        return client_states[0]  # one centre per stage: the generator as it left it

    def synthetic_images(self, run, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The generator's images of `labels` (coded by `codes`), in [0, 1] like the real ones."""
        G = run.ctx.model
        G.eval()
        maps = coded(labels, codes)
        with torch.no_grad():
            return torch.cat([(G(maps[i:i + 64]) + 1) / 2 for i in range(0, len(maps), 64)])

    def evaluate(self, run, global_state):
        from papers.tdgan.downstream import evaluate_downstream
        run.ctx.model.load_state_dict(global_state)
        train_maps = run.y
        synthetic = self.synthetic_images(run, train_maps, self.train_codes(run))
        metrics = evaluate_downstream(run, synthetic, train_maps, self.segmenter)
        test_fake = self.synthetic_images(run, run.y_test, self.codes(run, run.test_domain))
        centres = [run.test_domain == d for d in range(len(run.ctx.data.domains))]
        metrics["centre_l1"] = [F.l1_loss(test_fake[on], run.x_test[on]).item() for on in centres]
        # the image of each centre's first test label map, as 8-bit RGB, for the report's figure
        metrics["generated"] = [(255 * test_fake[on][0]).round().to(torch.uint8).tolist() for on in centres]
        return metrics


@register_algorithm("real_data")
class RealData(TDGAN):
    """No generator: the downstream segmenter trains on the real images of every centre (the upper bound)."""

    def train_client(self, run, client, round_index):
        return 0.0, 0

    def evaluate(self, run, global_state):
        from papers.tdgan.downstream import evaluate_downstream
        return evaluate_downstream(run, run.x, run.y, self.segmenter)
