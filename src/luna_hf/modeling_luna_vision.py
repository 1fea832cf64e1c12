"""Luna's image input (`LunaConfig.image_size` set): ViT's patch embeddings, [CLS] token and learned positions in
front of Luna's layers, and the first layer's P. Imported by modeling_luna.py; copied with the remote code.
docs/vision.md."""

import torch
from torch import nn

from .configuration_luna import LunaConfig


class LunaPatchEmbeddings(nn.Module):
    """X = [CLS; the image's patches, each projected by one convolution] + learned positions, then dropout: ViT's
    embeddings (no LayerNorm there: ViT's pre-LayerNorm layers normalise their inputs). P, for the nested attention,
    is a learned embedding of `projected_length` slots, as for text; the learned-kernel attention gets None."""

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.image_size, self.patch_size, self.num_channels = config.image_size, config.patch_size, config.num_channels
        patch = config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.empty(1, config.num_patches + 1, config.hidden_size))
        self.projected_embeddings = None
        if config.attention_type == "nested":
            self.projected_embeddings = nn.Parameter(torch.empty(config.projected_length, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values, slot_mask=None, interpolate_pos_encoding: bool = False):
        """X (batch, 1 + patches, hidden) and P (batch, l', hidden) or None; `slot_mask` (batch, l') marks P's
        usable slots."""
        height, width = self.check(pixel_values, interpolate_pos_encoding)
        patches = self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        batch_size = patches.shape[0]
        hidden_states = torch.cat([self.cls_token.expand(batch_size, -1, -1), patches], dim=1)
        positions = self.position_embeddings
        if interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
            positions = self.interpolated_positions(height // self.patch_size, width // self.patch_size)
        hidden_states = self.dropout(hidden_states + positions)
        if self.projected_embeddings is None:
            return hidden_states, None
        packed_states = self.projected_embeddings[: slot_mask.shape[1]].expand(batch_size, -1, -1)
        return hidden_states, self.dropout(packed_states) * slot_mask.unsqueeze(-1).to(packed_states.dtype)

    def check(self, pixel_values, interpolate_pos_encoding: bool) -> tuple[int, int]:
        if pixel_values.dim() != 4 or not pixel_values.is_floating_point() or 0 in pixel_values.shape:
            raise ValueError(f"pixel_values must be a non-empty float tensor (batch, channels, height, width), got "
                             f"shape {tuple(pixel_values.shape)}, dtype {pixel_values.dtype}.")  # fmt: skip
        channels, height, width = pixel_values.shape[1:]
        if channels != self.num_channels:
            raise ValueError(f"pixel_values have {channels} channels; this model reads {self.num_channels} "
                             "(config.num_channels): convert the images with its image processor.")  # fmt: skip
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"The image ({height}x{width}) is not a whole number of {self.patch_size}x"
                             f"{self.patch_size} patches: resize it with the model's image processor.")  # fmt: skip
        if not interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"The image is {height}x{width}; this model's positions are for {self.image_size}x{self.image_size} "
                "(config.image_size): resize it with the model's image processor, or pass "
                "interpolate_pos_encoding=True to interpolate the positions to this size."
            )
        return height, width

    def interpolated_positions(self, rows: int, columns: int) -> torch.Tensor:
        """The patches' learned positions resized to a rows x columns grid (bicubic, as ViT's
        `interpolate_pos_encoding`); the [CLS] position as it is."""
        side = self.image_size // self.patch_size
        grid = self.position_embeddings[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(rows, columns), mode="bicubic", align_corners=False)
        return torch.cat([self.position_embeddings[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


__all__ = ["LunaPatchEmbeddings"]
