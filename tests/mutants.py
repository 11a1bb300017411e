"""Wrong variants of shared building blocks, for the mutation probes of the golden tests: a golden
comparison that still passes with one of these in place could not catch that bug (test helper)."""

from __future__ import annotations

import torch

from models.layers import chunk_attention_mask


def mask_sees_next_frame(valid: torch.Tensor, chunk_frames) -> torch.Tensor:
    """Off by one: a streaming query also sees the first position of the next chunk (offline unchanged)."""
    c = torch.as_tensor(chunk_frames)
    return chunk_attention_mask(valid, torch.where(c > 0, c + 1, c))


def mask_without_left_chunks(valid: torch.Tensor, chunk_frames) -> torch.Tensor:
    """num_decoding_left_chunks=0 instead of upstream's -1: a streaming query sees its own chunk only."""
    mask = chunk_attention_mask(valid, chunk_frames)
    c = int(torch.as_tensor(chunk_frames).reshape(-1)[0])
    if c <= 0:
        return mask
    pos = torch.arange(valid.shape[1], device=valid.device) // c
    return mask & (pos.unsqueeze(0) >= pos.unsqueeze(1)).unsqueeze(0)


CHUNK_MASK_MUTANTS = {"next-frame": mask_sees_next_frame, "no-left-chunks": mask_without_left_chunks}
