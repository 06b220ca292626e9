"""Fine-tuning components in-process: the classifier and its initialization from MAE-layout
weights, layer-wise lr decay, mixup / cutmix / erasing, the recipes' losses, the De³ module."""

import math

import pytest
import torch
import torch.nn.functional as F

from robustmim.config import load_config
from robustmim.errors import UserError
from robustmim.pipeline.engine.optim import WarmupCosine, build_optimizer, layer_decay_groups
from robustmim.pipeline.finetune.config import FinetuneOptimConfig, MixupConfig, RecipeConfig
from robustmim.pipeline.finetune.mixing import BatchMixer, random_erase, smooth_one_hot, soft_cross_entropy
from robustmim.pipeline.finetune.recipes import DenoisedTraining, build_recipe
from robustmim.pipeline.finetune.task import FinetuneModule
from robustmim.pipeline.models.classifier import ViTClassifier, load_pretrained_encoder
from robustmim.pipeline.models.deployed import DenoiseThenClassify, Plain, SmoothingBase, denoise
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.randomness import step_generator

from helpers import tiny_classifier_config, tiny_model_config



def generator(seed=0):
    return step_generator(seed, 0, 0, "cpu")


def official_mae_checkpoint(tmp_path, **model_values):
    """An MAE pretraining checkpoint as the official releases store it: {"model": state_dict}
    with facebookresearch/mae's key names (test_models checks our autoencoder has exactly those)."""
    torch.manual_seed(1)
    state = MaskedAutoencoder(tiny_model_config(**model_values)).state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state, "epoch": 799}, path)
    return path, state


def test_official_mae_state_dict_initializes_every_encoder_key(tmp_path):
    path, state = official_mae_checkpoint(tmp_path)
    model = ViTClassifier(tiny_classifier_config())
    report = load_pretrained_encoder(model, path)
    # as MAE's main_finetune asserts: only the new head and fc_norm are missing
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(report.unexpected) == {"norm.weight", "norm.bias"}  # unused with global pooling
    assert not report.mismatched
    own = model.state_dict()
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.3.mlp.fc2.weight"):
        assert torch.equal(own[key], state[key]), key
    cls_model = ViTClassifier(tiny_classifier_config(global_pool=False))
    assert set(load_pretrained_encoder(cls_model, path).missing) == {"head.weight", "head.bias"}


def maes_interpolate_pos_embed(pos_embed, grid):
    """MAE's util/pos_embed.interpolate_pos_embed, written out: bicubic on the patch grid, no
    antialiasing, the CLS slot kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(patches.shape[1] ** 0.5)
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("img_size,grid", [(32, 8), (20, 5)])  # up and down from 7x7
def test_position_embedding_is_resized_for_another_resolution_as_mae_does(tmp_path, img_size, grid):
    path, state = official_mae_checkpoint(tmp_path)  # 28 px: a 7x7 grid
    model = ViTClassifier(tiny_classifier_config(img_size=img_size))
    load_pretrained_encoder(model, path)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 192)
    assert torch.equal(model.pos_embed[0, 0], state["pos_embed"][0, 0])  # the CLS slot is kept
    torch.testing.assert_close(model.pos_embed.detach(), maes_interpolate_pos_embed(state["pos_embed"], grid),
                               rtol=0, atol=1e-6)


def test_a_position_embedding_off_a_square_grid_is_refused(tmp_path):
    path, state = official_mae_checkpoint(tmp_path)
    state["pos_embed"] = state["pos_embed"][:, :-1]  # 48 patch positions
    torch.save({"model": state}, path)
    with pytest.raises(UserError, match="48 patch positions is not a square grid"):
        load_pretrained_encoder(ViTClassifier(tiny_classifier_config()), path)


def test_a_checkpoint_lacking_encoder_keys_is_refused(tmp_path):
    path, state = official_mae_checkpoint(tmp_path)
    del state["blocks.2.attn.qkv.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(UserError, match="blocks.2.attn.qkv.weight"):
        load_pretrained_encoder(ViTClassifier(tiny_classifier_config()), path)


def test_the_lr_warms_up_linearly_then_follows_a_cosine_down_to_min_lr():
    """10 warmup and 110 total steps at peak 2e-3 (base_lr 1e-3 at batch 512), min_lr 1e-5:
    the expected values are written out here, not taken from the schedule's code."""
    param = torch.nn.Parameter(torch.zeros(2))
    optim = load_config(FinetuneOptimConfig, None, ["base_lr=1e-3", "min_lr=1e-5", "layer_decay=1.0"])
    optimizer, scheduler = build_optimizer([{"params": [param], "lr_scale": 1.0}], optim, 512, 10, 110)
    lrs = []
    for _ in range(121):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[4] == pytest.approx(0.8e-3) and lrs[10] == pytest.approx(2e-3)
    assert lrs[35] == pytest.approx(1e-5 + (2e-3 - 1e-5) * (1 + 0.7071067811865476) / 2)  # a quarter: cos(pi/4)
    assert lrs[60] == pytest.approx((2e-3 + 1e-5) / 2)  # halfway: the mean of peak and floor
    assert lrs[110] == pytest.approx(1e-5) and lrs[120] == pytest.approx(1e-5)  # and it stays there
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_layer_decay_gives_each_block_its_lr():
    model = ViTClassifier(tiny_classifier_config())
    optim = load_config(FinetuneOptimConfig, None, ["layer_decay=0.75", "base_lr=1e-3", "min_lr=0"])
    depth, decay = 4, 0.75
    groups = layer_decay_groups(model, optim.weight_decay, optim.layer_decay, depth)
    optimizer, scheduler = build_optimizer(groups, optim, global_batch=512, warmup_steps=10, total_steps=100)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    peak = 1e-3 * 512 / 256
    now = peak * WarmupCosine(10, 100, 0.0)(30)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected_scale = {"patch_embed.proj.weight": decay ** 5, "cls_token": decay ** 5, "pos_embed": decay ** 5,
                      "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for block in range(depth):
        expected_scale[f"blocks.{block}.attn.qkv.weight"] = decay ** (depth - block)
        expected_scale[f"blocks.{block}.norm1.bias"] = decay ** (depth - block)
    for name, scale in expected_scale.items():
        assert lr_of[id(params[name])] == pytest.approx(now * scale, rel=1e-9), name
    assert wd_of[id(params["blocks.0.attn.qkv.weight"])] == optim.weight_decay
    for name in ("blocks.0.norm1.bias", "pos_embed", "cls_token", "head.bias"):
        assert wd_of[id(params[name])] == 0.0, name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["lr_scale"], g["weight_decay"]) for g in groups]


def test_timms_layer_decay_groups_equal_maes_only_with_global_pooling():
    """Why the classifier keeps MAE's grouping rather than timm.optim.param_groups_layer_decay:
    with global average pooling (MAE's fine-tuning, our default) timm's groups are the same
    parameters, order, lr scales and weight decays; with CLS pooling timm gives the final `norm`
    the last block's lr, where MAE's lrd gives it the head's."""
    from timm.optim import param_groups_layer_decay

    for global_pool, same in ((True, True), (False, False)):
        model = ViTClassifier(tiny_classifier_config(global_pool=global_pool))
        ours = group_names(model, layer_decay_groups(model, 0.05, 0.75, depth=4))
        timms = group_names(model, param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.75))
        assert (ours == timms) is same
    norm_scale = {name: scale for names, scale, _ in timms for name in names}["norm.weight"]
    assert norm_scale == 0.75 and {n: s for names, s, _ in ours for n in names}["norm.weight"] == 1.0


def test_mixup_and_cutmix_targets_match_the_mixed_images():
    images = torch.rand(8, 1, 28, 28)
    labels = torch.arange(8) % 10
    for cfg, kind in ((MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0), "mixup"),
                      (MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0), "cutmix")):
        mixed, targets = BatchMixer(cfg, 10, smoothing=0.0)(images, labels, generator(3))
        assert torch.allclose(targets.sum(-1), torch.ones(8))
        lam = targets[0, labels[0]].item() if labels[0] != labels[-1] else None
        if kind == "mixup":
            assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam), atol=1e-6)
        else:  # the share of own pixels equals lambda
            own = (mixed == images).float().mean().item()
            assert own == pytest.approx(lam, abs=1e-6)
    again = BatchMixer(MixupConfig(), 10, 0.1)(images, labels, generator(3))
    first = BatchMixer(MixupConfig(), 10, 0.1)(images, labels, generator(3))
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])  # seeded


def test_label_smoothing_and_soft_cross_entropy_match_torch():
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    targets = smooth_one_hot(labels, 10, 0.1)
    assert torch.allclose(soft_cross_entropy(logits, targets), F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_random_erasing_boxes():
    images = torch.rand(64, 1, 28, 28)
    mean, std = torch.tensor(0.3).view(1, 1, 1, 1), torch.tensor(0.35).view(1, 1, 1, 1)
    assert torch.equal(random_erase(images, 0.0, mean, std, generator()), images)
    erased = random_erase(images, 1.0, mean, std, generator())
    changed = (erased != images).float().mean(dim=(1, 2, 3))
    assert (changed > 0.01).all() and (changed < 0.45).all()  # one box of 2-33% of the image each
    half = random_erase(images, 0.5, mean, std, generator(5))
    assert 15 <= int(((half != images).flatten(1).any(1)).sum()) <= 49


def recipe_module(name, *overrides):
    cfg = load_config(RecipeConfig, None, [f"name={name}", *overrides])
    torch.manual_seed(0)
    model = ViTClassifier(tiny_classifier_config(drop_path=0.0))
    torch.nn.init.normal_(model.head.weight)  # not the near-zero init: predictions must differ
    return FinetuneModule(model, build_recipe(cfg, 10)), cfg


def test_dmae_consistency_terms():
    module, cfg = recipe_module("dmae", "mixup.prob=0", "random_erasing=0", "dmae.sigma=0.5")
    images, labels = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss, metrics = module(images, labels, generator(1))
    # recompute from the same draws: noise on each of 2 interleaved copies
    g = generator(1)
    repeated = images.repeat_interleave(2, dim=0)
    logits = module.model(repeated + 0.5 * torch.randn(repeated.shape, generator=g))
    probs = logits.softmax(-1).view(4, 2, 10)
    mean = probs.mean(1)
    kl = sum(F.kl_div(probs[:, i].log(), mean, reduction="batchmean") for i in range(2)) / 2
    entropy = -(mean * mean.log()).sum(-1).mean()
    ce = F.cross_entropy(logits, labels.repeat_interleave(2), label_smoothing=0.1)
    assert metrics["consistency_kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert loss.item() == pytest.approx((ce + 2.0 * kl + 0.5 * entropy).item(), rel=1e-4)
    assert cfg.dmae.eta == 0.5 and load_config(RecipeConfig, None, ["dmae.sigma=1.0"]).dmae.eta == 0.1


def test_adversarial_training_attacks_within_epsilon_and_raises_the_loss():
    module, cfg = recipe_module("mimir", "mixup.prob=0", "random_erasing=0", "mimir.epsilon=0.0314",
                                "mimir.step_size=0.0078", "mimir.steps=5")
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    seen = []
    real_forward = module.model.forward
    module.model.forward = lambda x: (seen.append(x.detach()), real_forward(x))[1]
    loss, _ = module(images, labels, generator(2))
    adv = seen[-1]
    assert (adv - images).abs().max() <= 0.0314 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    clean_loss = F.cross_entropy(real_forward(images), labels, label_smoothing=0.1)
    assert loss.item() > clean_loss.item()


def test_each_recipe_deploys_its_defense_around_the_classifier_with_its_frozen_networks():
    classifier = ViTClassifier(tiny_classifier_config())
    for name, kind in (("standard", Plain), ("mimir", Plain), ("dmae", SmoothingBase)):
        cfg = load_config(RecipeConfig, None, [f"name={name}", "dmae.sigma=0.5"])
        deployed = build_recipe(cfg, 10).deploy(classifier)
        assert type(deployed) is kind and deployed.classifier is classifier
    assert deployed.sigma == 0.5 and deployed.randomized
    denoiser = MaskedAutoencoder(tiny_model_config())
    cfg = load_config(RecipeConfig, None, ["name=de3", "de3.denoiser=nim.safetensors", "de3.deploy_sigma=51"])
    recipe = DenoisedTraining(cfg, 10, denoiser, norm_pix=False)
    deployed = recipe.deploy(classifier)
    assert type(deployed) is DenoiseThenClassify and deployed.denoiser is denoiser and deployed.classifier is classifier
    assert deployed.sigma == pytest.approx(0.2) and deployed.norm_pix is False
    assert recipe.frozen_networks() == [denoiser] and not denoiser.training
    assert not any(p.requires_grad for p in denoiser.parameters())
    assert set(FinetuneModule(classifier, recipe).state_dict()) == {f"model.{k}" for k in classifier.state_dict()}


def test_de3_module_passes_gradients_to_its_input_through_the_denoiser():
    torch.manual_seed(0)
    denoiser, classifier = MaskedAutoencoder(tiny_model_config()), ViTClassifier(tiny_classifier_config(drop_path=0.0))
    deployed = DenoiseThenClassify(denoiser, classifier, sigma=0.1, norm_pix=True).eval()
    images = torch.rand(4, 1, 28, 28, requires_grad=True)
    deployed(images, deployed.draw_noise(images, generator(0))).logsumexp(-1).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in denoiser.parameters())  # frozen, yet differentiable w.r.t. input
    noise = torch.randn(4, 1, 28, 28)
    assert torch.equal(deployed(images, noise=noise), deployed(images, noise=noise))


def test_denoiser_statistics_correct_for_the_known_noise():
    """A perfect norm-pix prediction un-normalized with noisy-patch statistics overshoots the
    contrast; subtracting the known noise variance brings it closer to the clean image
    (measured RMS error at sigma 0.3: 0.188 naive, 0.133 corrected, 0.298 for the noisy input)."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(tiny_model_config())
    clean = torch.rand(64, 1, 28, 28) * 0.6 + 0.2
    patches = model.patchify(model.normalize(clean))
    perfect = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    sigma = 0.3
    noisy = clean + sigma * torch.randn(clean.shape)
    naive = model.reconstruct_image(perfect, noisy, True)
    corrected = model.reconstruct_image(perfect, noisy, True, noise_sigma=sigma)
    error = lambda x: (x - clean).pow(2).mean().sqrt().item()  # noqa: E731
    assert error(corrected) < 0.8 * error(naive) < 0.8 * error(noisy)
    assert math.isclose(error(model.reconstruct_image(perfect, clean, True)), 0, abs_tol=1e-3)
    assert torch.equal(denoise(model, noisy, sigma, True), denoise(model, noisy, torch.full((64,), sigma), True))


def test_fine_tuning_takes_the_input_normalization_of_its_encoder(tmp_path):
    """A MIMIR encoder (raw [0, 1] pixels) and an MAE encoder (ImageNet statistics) fine-tuned with the
    same MIMIR recipe: each classifier normalizes as its own encoder was pretrained."""
    import json

    from robustmim.pipeline.finetune.config import FinetuneConfig
    from robustmim.pipeline.finetune.task import with_encoder_normalization

    def export(name, mean, std):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
        (tmp_path / f"{name}.json").write_text(json.dumps({"model": {"pixel_mean": mean, "pixel_std": std}}))
        return str(tmp_path / f"{name}.safetensors")

    raw = load_config(FinetuneConfig, "configs/finetune/mimir_vitl_in1k.yaml", ["init="])
    assert (raw.model.pixel_mean, raw.model.pixel_std) == ([0.0] * 3, [1.0] * 3)  # MIMIR's convention
    mae = export("mae", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    adopted, note = with_encoder_normalization(load_config(FinetuneConfig, "configs/finetune/mimir_vitl_in1k.yaml",
                                                           [f"init={mae}"]))
    assert adopted.model.pixel_mean == [0.485, 0.456, 0.406] and adopted.model.pixel_std == [0.229, 0.224, 0.225]
    assert "mae.json" in note and "pixel_mean [0.485, 0.456, 0.406]" in note
    mimir = export("mimir", [0.0] * 3, [1.0] * 3)
    same, note = with_encoder_normalization(load_config(FinetuneConfig, "configs/finetune/mimir_vitl_in1k.yaml",
                                                        [f"init={mimir}"]))
    assert note is None and same.model.pixel_mean == [0.0] * 3
    official = tmp_path / "mae_pretrain_vit_large.pth"  # no JSON beside it: the config's values stand
    kept, note = with_encoder_normalization(load_config(FinetuneConfig, "configs/finetune/mimir_vitl_in1k.yaml",
                                                        [f"init={official}"]))
    assert note is None and kept.model.pixel_mean == [0.0] * 3
