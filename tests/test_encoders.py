"""Observation encoders: shapes, ResNet-18 size, keypoints, cropping, task inputs, gradients."""

from __future__ import annotations

import pytest
import torch

from robomosaic.data.spec import KeySpec
from robomosaic.policies.encoders import (
    ImageEncoder,
    ObservationEncoder,
    ResNet18Trunk,
    SpatialSoftmax,
    StateEncoder,
    TaskEncoder,
)

torch.manual_seed(0)

SPEC = {
    "robot0_eef_pos": KeySpec((3,), "float64"),
    "object": KeySpec((10,), "float64"),
    "agentview_image": KeySpec((84, 84, 3), "uint8"),
    "robot0_eye_in_hand_image": KeySpec((84, 84, 3), "uint8"),
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_batch(spec, batch: int, n_obs_steps: int) -> dict[str, torch.Tensor]:
    return {
        k: torch.randint(0, 256, (batch, n_obs_steps, *v.shape), dtype=torch.uint8)
        if v.is_image
        else torch.randn(batch, n_obs_steps, *v.shape)
        for k, v in spec.items()
    }


def test_resnet18_trunk_has_torchvision_resnet18_size_and_output():
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in the fc layer; GroupNorm
    # has the same affine parameters as the BatchNorm it replaces.
    trunk = ResNet18Trunk(3)
    assert n_params(trunk) == 11_689_512 - 513_000
    assert trunk(torch.rand(2, 3, 76, 76)).shape == (2, 512, 3, 3)
    assert n_params(ResNet18Trunk(1)) == n_params(trunk) - 64 * 7 * 7 * 2


def test_narrow_trunk_scales_every_stage():
    narrow = ResNet18Trunk(3, width=16)
    assert narrow(torch.rand(2, 3, 76, 76)).shape == (2, 128, 3, 3)
    # conv weights scale with width^2 (GroupNorm and the 3-channel stem less): about 1/16
    assert 1 / 17 < n_params(narrow) / n_params(ResNet18Trunk(3)) < 1 / 15
    with pytest.raises(ValueError, match="image_width must be a positive multiple of 16"):
        ResNet18Trunk(3, width=24)


def test_spatial_softmax_keypoints_lie_in_unit_square():
    keypoints = SpatialSoftmax(16, num_kp=8)(torch.randn(4, 16, 5, 7) * 10)
    assert keypoints.shape == (4, 8, 2)
    assert keypoints.abs().max() <= 1.0


def test_spatial_softmax_finds_a_peak_in_image_coordinates():
    head = SpatialSoftmax(1, num_kp=1)
    with torch.no_grad():
        head.keypoints.weight.fill_(1.0)
        head.keypoints.bias.zero_()
    features = torch.zeros(2, 1, 5, 9)
    features[0, 0, 0, 8] = 50.0  # top right
    features[1, 0, 4, 0] = 50.0  # bottom left
    keypoints = head(features)[:, 0]
    assert torch.allclose(keypoints, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-3)


def position_coded_images(n: int, size: int = 84) -> torch.Tensor:
    """(n, size, size, 3) float images whose pixel value is row * size + col."""
    coords = torch.arange(size * size, dtype=torch.float32).view(size, size)
    return coords[None, :, :, None].expand(n, size, size, 3).clone()


def test_random_crop_only_in_train_mode():
    encoder = ImageEncoder((84, 84, 3), crop_shape=(76, 76))
    images = encoder.to_float_chw(position_coded_images(64))

    encoder.eval()
    center = encoder.crop(images)
    assert center.shape == (64, 3, 76, 76)
    assert torch.equal(center, images[:, :, 4:80, 4:80])
    assert torch.equal(encoder.crop(images), center)

    encoder.train()
    crops = encoder.crop(images)
    assert crops.shape == (64, 3, 76, 76)
    corners = set()
    for image, crop in zip(images, crops, strict=True):
        top, left = divmod(int(crop[0, 0, 0]), 84)
        assert 0 <= top <= 8 and 0 <= left <= 8
        assert torch.equal(crop, image[:, top : top + 76, left : left + 76])
        corners.add((top, left))
    assert len(corners) > 10  # crops are drawn per image, not one for the batch


def test_image_encoder_accepts_uint8_hwc_and_float_chw():
    encoder = ImageEncoder((84, 84, 3), crop_shape=(76, 76), num_kp=16, feature_dim=32).eval()
    images = torch.randint(0, 256, (3, 84, 84, 3), dtype=torch.uint8)
    with torch.no_grad():
        from_uint8 = encoder(images)
        from_float = encoder(images.permute(0, 3, 1, 2).float() / 255.0)
    assert from_uint8.shape == (3, 32)
    assert torch.allclose(from_uint8, from_float, atol=1e-5)
    keypoints = encoder.keypoints(images)
    assert keypoints.shape == (3, 16, 2) and keypoints.abs().max() <= 1.0
    with pytest.raises(ValueError, match="images must be"):
        encoder(torch.rand(3, 64, 64, 3))
    with pytest.raises(ValueError, match="crop_shape"):
        ImageEncoder((84, 84, 3), crop_shape=(90, 76))


def test_state_encoder_concatenates_history():
    states = {"a": torch.randn(4, 2, 3), "b": torch.randn(4, 2, 2, 2)}
    flat = StateEncoder({"a": 3, "b": 4}, n_obs_steps=2, out_dim=None)
    assert flat.out_dim == 14
    expected = torch.cat([states["a"], states["b"].flatten(2)], dim=-1).flatten(1)
    assert torch.equal(flat(states), expected)
    encoder = StateEncoder({"a": 3, "b": 4}, n_obs_steps=2, hidden_dims=(32, 32), out_dim=16)
    assert encoder(states).shape == (4, 16)


def test_task_encoder_ids_and_text():
    ids = TaskEncoder(8, num_tasks=3)
    out = ids(torch.tensor([0, 1, 2, 1]))
    assert out.shape == (4, 8)
    assert torch.equal(out[1], out[3]) and not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="out of range"):
        ids(torch.tensor([3]))
    with pytest.raises(ValueError, match="task_id is required"):
        ids(None)

    both = TaskEncoder(8, num_tasks=3, text_dim=12)
    text = torch.randn(2, 12)
    task_id = torch.tensor([1, 1])
    expected = both.ids(task_id) + both.text(text)
    assert torch.allclose(both(task_id, text), expected)
    assert not torch.allclose(both(task_id, text)[0], both(task_id, text)[1])
    with pytest.raises(ValueError, match="text_embedding is required"):
        both(task_id, None)


def test_observation_encoder_combines_state_cameras_and_task():
    encoder = ObservationEncoder(
        SPEC, n_obs_steps=2, crop_shape=(76, 76), state_feature_dim=32, num_tasks=4, text_dim=6
    )
    assert list(encoder.images) == ["agentview_image", "robot0_eye_in_hand_image"]
    assert encoder.obs_keys == list(SPEC)
    assert encoder.out_dim == 32 + 2 * 2 * 64 + 32
    batch = random_batch(SPEC, batch=3, n_obs_steps=2)
    batch["task_id"] = torch.tensor([0, 3, 1])
    batch["text_embedding"] = torch.randn(3, 6)
    encoder.eval()
    with torch.no_grad():
        out = encoder(batch)
        assert out.shape == (3, encoder.out_dim)
        for key in [*SPEC, "task_id", "text_embedding"]:
            changed = dict(batch)
            changed[key] = batch[key].flip(0)  # swap samples of one input only
            assert not torch.allclose(encoder(changed), out), f"output ignores {key}"


def test_observation_encoder_has_one_image_encoder_per_camera():
    encoder = ObservationEncoder(SPEC, n_obs_steps=1).eval()
    cams = list(encoder.images.values())
    assert cams[0] is not cams[1]
    assert not set(map(id, cams[0].parameters())) & set(map(id, cams[1].parameters()))
    images = torch.randint(0, 256, (2, 84, 84, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert not torch.allclose(cams[0](images), cams[1](images))


def test_observation_encoder_gradients_reach_every_parameter():
    encoder = ObservationEncoder(SPEC, n_obs_steps=2, crop_shape=(76, 76), num_tasks=3, text_dim=5)
    batch = random_batch(SPEC, batch=2, n_obs_steps=2)
    batch["task_id"] = torch.tensor([0, 2])
    batch["text_embedding"] = torch.randn(2, 5)
    encoder(batch).square().mean().backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    zero = [name for name, p in encoder.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"zero gradient for {zero}"


def test_observation_encoder_plain_shapes_and_explicit_image_keys():
    shapes = {"pos": (3,), "wrist": (32, 32, 1)}
    encoder = ObservationEncoder(shapes, n_obs_steps=3, image_keys=["wrist"], state_feature_dim=None)
    assert encoder.out_dim == 3 * 3 + 3 * 64
    batch = {"pos": torch.randn(2, 3, 3), "wrist": torch.rand(2, 3, 32, 32, 1)}
    assert encoder(batch).shape == (2, encoder.out_dim)


def test_observation_encoder_names_bad_inputs():
    encoder = ObservationEncoder({"pos": (3,), "obj": (4,)}, n_obs_steps=2)
    with pytest.raises(KeyError, match="'obj'"):
        encoder({"pos": torch.randn(2, 2, 3)})
    with pytest.raises(ValueError, match=r"'obj' must be \(batch, \*\(2, 4\)\)"):
        encoder({"pos": torch.randn(2, 2, 3), "obj": torch.randn(2, 1, 4)})
    with pytest.raises(ValueError, match="image_keys"):
        ObservationEncoder({"pos": (3,)}, n_obs_steps=2, image_keys=["cam"])
