"""The batched crop-and-flip draws what torchvision's RandomCrop(padding) + RandomHorizontalFlip draw."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atofx.app.batch_augmentation import crop_and_flip


def _every_crop(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """All (2p+1)^2 crops of the zero-padded image, each plain and mirrored: what one draw may return."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    crops = [padded[..., i:i + h, j:j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_each_image_is_one_of_its_own_crops_or_their_mirror_images():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 9, 7), dtype=torch.uint8)  # no zero pixel: padding is visible
    out = crop_and_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for image, got in zip(images, out, strict=True):
        assert any(torch.equal(got, c) for c in _every_crop(image, 2))


def test_offsets_and_flips_cover_the_range_per_image():
    torch.manual_seed(1)
    images = torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5).repeat(2000, 1, 1, 1)
    out = crop_and_flip(images, padding=1)
    seen = {tuple(o.flatten().tolist()) for o in out}
    assert len(seen) == 18  # 3 x 3 offsets, each plain or mirrored: every one drawn, per image not per batch
    mirrored = sum(bool(o[0, 2, 1] > o[0, 2, 3]) for o in out)  # the middle row runs backwards
    assert 800 < mirrored < 1200  # about half the images flipped


def test_the_draws_follow_the_global_seed():
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    torch.manual_seed(3)
    first = crop_and_flip(images, 2)
    torch.manual_seed(3)
    assert torch.equal(first, crop_and_flip(images, 2))
