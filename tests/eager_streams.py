"""The stream layout as lm-lstm built it before it was read lazily (commit 27b34b7, `StreamBlocks.__init__`): every
block materialised in arrays. Tests compare the lazy `lm_lstm.streams.StreamBlocks` with it."""

import math

import numpy as np


def eager_layout(documents, block_size, eos_token_id, pad_token_id, num_streams, world_size=1, max_blocks=None,
                 document_bytes=None):
    """(inputs, targets, resets, target_bytes) of the layout, as the eager implementation computed them."""
    documents = list(documents)
    sizes = list(document_bytes) if document_bytes is not None else [[0] * len(d) for d in documents]
    documents, sizes = [d for d in documents if d], [b for d, b in zip(documents, sizes) if d]
    inputs, targets, target_sizes, starts = [], [], [], []
    for document, document_sizes in zip(documents, sizes):
        padding = -len(document) % block_size
        inputs.append(np.array([eos_token_id, *document[:-1]] + [pad_token_id] * padding, dtype=np.int64))
        targets.append(np.array(document + [-100] * padding, dtype=np.int64))
        target_sizes.append(np.array(document_sizes + [0] * padding, dtype=np.int64))
        first_blocks = np.zeros((len(document) + padding) // block_size, dtype=bool)
        first_blocks[0] = True
        starts.append(first_blocks)
    inputs, targets = np.concatenate(inputs).reshape(-1, block_size), np.concatenate(targets).reshape(-1, block_size)
    starts = np.concatenate(starts)
    if max_blocks is not None:
        inputs, targets, starts = inputs[:max_blocks], targets[:max_blocks], starts[:max_blocks]
    kept_sizes = np.concatenate(target_sizes)[: targets.size]
    target_bytes = int(kept_sizes.sum()) if document_bytes is not None else None
    total_streams = num_streams * world_size
    blocks_per_stream = math.ceil(len(inputs) / total_streams)
    empty = total_streams * blocks_per_stream - len(inputs)
    shape = (total_streams, blocks_per_stream, block_size)
    inputs = np.concatenate([inputs, np.full((empty, block_size), pad_token_id)]).reshape(shape)
    targets = np.concatenate([targets, np.full((empty, block_size), -100)]).reshape(shape)
    resets = np.concatenate([starts, np.zeros(empty, dtype=bool)]).reshape(shape[:2])
    resets[:, 0] = True
    return inputs, targets, resets, target_bytes
