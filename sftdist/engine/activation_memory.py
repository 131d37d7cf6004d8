"""What one micro-batch's forward keeps for backward, from shapes alone (pure arithmetic): the decoder
layers' activations, LoRA's adapter inputs, and the LM head's logits.

Decoder layers with a gated MLP (Llama, Mistral, Qwen2 and the other models sftdist trains: RMSNorm, rotary
attention, SwiGLU) are counted tensor by tensor, from what autograd saves in transformers' decoder layer
under sftdist's attention (``bench/plan_rss.py``; fp32 CPU, SmolLM2-135M's shape, 2 x 512 tokens: the count
is within 1% of the saved bytes, see ``bench/RESULTS.md``). Per token and layer, in elements of the
activation dtype, with hidden size ``h``, MLP width ``i``, ``a`` heads and ``s`` tokens per sequence:

- to backpropagate through the layer at all (frozen or not): both RMSNorms' inputs (``2h``); the attention's
  query, key and value, the key and value repeated to every query head (sftdist's attention by document,
  which sdpa becomes for these models, repeats them; flash-attention keeps them at the KV heads, so this
  overstates it there), and its output (``4h``); the SiLU's input and both operands of the gate product
  (``3i``); with eager attention also the softmax's probabilities (``a*s``);
- for the weights' gradients, when the base model trains (full fine-tuning): both RMSNorms' normalised
  values (``2h``) and the inputs of the q/k/v, o, gate/up and down projections (``3h + i``);
- LoRA, per adapted linear layer with ``f`` input features and rank ``r``: with dropout, the dropped-out
  copy of the input that ``lora_A`` saves (``f``) and dropout's mask (``f`` more in the activation dtype on
  CPU, where dropout multiplies by a noise tensor; one byte each on a GPU, whose fused dropout keeps a bool
  mask); without dropout ``lora_A`` saves the layer's own input, at most the ``3h + i`` distinct inputs a
  layer has; and ``lora_A``'s output (``r``).

So full fine-tuning keeps ``11h + 4i`` elements per token and layer, and LoRA with dropout on every linear
layer ``6h + 3i`` plus ``2 x (4h + 2h + i)`` (Llama's seven projections: q, k, v, o, gate, up from ``h``
features, down from ``i``) plus ``7r``. Other decoders (no gated MLP) use Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", eq. 2, no tensor/sequence parallelism): per layer
``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit, ``5*a*s/h`` being the score matrices that sdpa/flash never store.
With activation checkpointing each layer keeps its input (``h``) and one layer is live in full. In bf16/fp16
transformers' RMSNorm keeps its input upcast to fp32, 2 bytes per element more than counted for ``2h``.

A tiled MLP (``parallelism.tiled_mlp``, ``sftdist.engine.tiling``) keeps only its input (``h``; under full
fine-tuning that is the gate/up input already counted) and none of the ``3i`` through-terms, the down
projection's input (``i``) or the MLP adapters' tensors: backward recomputes them one tile of about ``h``
positions per row at a time, so one tile's worth is live on top.

Under sequence parallelism (``sftdist.engine.sequence_parallel``, SP ranks) a rank holds ``ceil(s / SP)``
positions of each row for all of the above. Attention's q, k, v and output are ``[b, a/SP, s, d]`` there, the
whole row for 1/SP of the heads: as many elements as ``s/SP`` positions of all heads, so the per-token count
holds (eager attention's scores are over the whole row). On top comes the all-to-all exchange of one layer
at a time (``exchange_bytes``).
"""

from __future__ import annotations

from sftdist.engine.memory_plan import BYTES, ModelShape


def layer_bytes_per_token(shape: ModelShape, *, seq: int, precision: str, fused_attention: bool,
                          frozen_base: bool = False, device: str = "gpu", tiled_mlp: bool = False) -> float:
    """Bytes one decoder layer keeps for backward per token (see the module docstring for each term).

    Example (h=8, i=16, 2 heads, fp32, 4 tokens per sequence): full fine-tuning 11*8 + 4*16 = 152
    elements; LoRA (r=2 on all seven projections, dropout) on CPU 6*8 + 3*16 + 2*(6*8 + 16) + 7*2 = 238,
    on a GPU 1-byte masks; eager attention adds 2*4 scores; a tiled MLP drops 4*16 under full fine-tuning.
        >>> full = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=1, hidden=8, heads=2,
        ...                   vocab=10, intermediate=16)
        >>> from dataclasses import replace
        >>> lora = replace(full, adapter_inputs=6 * 8 + 16, adapter_ranks=7 * 2, adapter_dropout=0.05)
        >>> kw = dict(seq=4, precision="fp32")
        >>> (layer_bytes_per_token(full, fused_attention=True, **kw),
        ...  layer_bytes_per_token(lora, fused_attention=True, frozen_base=True, device="cpu", **kw),
        ...  layer_bytes_per_token(lora, fused_attention=True, frozen_base=True, **kw),
        ...  layer_bytes_per_token(full, fused_attention=False, **kw),
        ...  layer_bytes_per_token(full, fused_attention=True, tiled_mlp=True, **kw))
        (608.0, 952.0, 760.0, 640.0, 352.0)

    Args:
        shape: ``hidden``, ``intermediate``, ``heads`` and the adapter counts are used.
        seq: Tokens per sequence, the whole row's under sequence parallelism (eager attention's scores).
        precision: The activation dtype.
        fused_attention: sdpa/flash attention, which never stores the score matrices.
        frozen_base: LoRA/QLoRA: the base weights get no gradient, so their inputs are not kept for one.
        device: ``cpu`` or ``gpu`` (how dropout keeps its mask).
        tiled_mlp: The MLP runs tiled (``parallelism.tiled_mlp``; only a ``shape.tileable_mlp`` gated MLP).

    Returns:
        Bytes per token of one layer.
    """
    d = BYTES[precision]
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    tiled = tiled_mlp and bool(i) and shape.tileable_mlp
    if i:
        # tiled, the MLP keeps only its input, which full fine-tuning counts among the projections' inputs
        mlp = (h if frozen_base else 0) if tiled else 3 * i
        through = 6 * h + mlp + (0 if fused_attention else a * seq)
        weights = 0 if frozen_base else 5 * h + (0 if tiled else i)
        base = (through + weights) * d
    else:  # Korthikanti et al. 2022, stated for 16-bit
        base = h * (34 + (0 if fused_attention else 5 * a * seq / h)) * d / 2
    layers = max(shape.layers, 1)
    inputs = (shape.adapter_inputs - (shape.mlp_adapter_inputs if tiled else 0)) / layers
    ranks = (shape.adapter_ranks - (shape.mlp_adapter_ranks if tiled else 0)) / layers
    if shape.adapter_dropout > 0:
        adapters = inputs * (d + (d if device == "cpu" else 1))
    else:  # lora_A saves the layer's input: at most the distinct inputs of the (untiled) projections
        distinct = 2 * h if tiled else 3 * h + i if i else inputs
        adapters = min(inputs, distinct) * d if frozen_base else 0.0
    return float(base + adapters + ranks * d)


def local_length(seq: int, sp: int) -> int:
    """Positions of a row on one rank under ``sp``-way sequence parallelism (the row padded to a multiple).

    Example:
        >>> local_length(2048, 1), local_length(32768, 8), local_length(1001, 2)
        (2048, 4096, 501)
    """
    return -(-seq // sp)


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq: int, precision: str, fused_attention: bool,
                     checkpointing: bool, frozen_base: bool = False, device: str = "gpu", sp: int = 1,
                     tiled_mlp: bool = False) -> float:
    """Activations kept for backward over one micro-batch on one rank: every layer's
    (``layer_bytes_per_token``), or under activation checkpointing every layer's input plus one layer in full;
    with a tiled MLP, one tile's MLP recomputed in backward on top.

    Example (2 layers, h=8, a=2, s=4, b=1, bf16, a GPT-style MLP): one layer is 4*8*(34 + 5*2*4/8) = 1248
    bytes, 1088 without the score matrix; checkpointed: 2 * 2*4*8 inputs + one layer; 2-way sequence
    parallel: 2 of the 4 positions.
        >>> s = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=2, hidden=8, heads=2,
        ...                vocab=10)
        >>> [activation_bytes(s, micro_batch=1, seq=4, precision="bf16", fused_attention=f, checkpointing=c)
        ...  for f, c in ((False, False), (True, False), (True, True))]
        [2496.0, 2176.0, 1216.0]
        >>> activation_bytes(s, micro_batch=1, seq=4, precision="bf16", fused_attention=True, checkpointing=False,
        ...                  sp=2)
        1088.0

    Args:
        shape, precision, fused_attention, frozen_base, device: As for ``layer_bytes_per_token``.
        micro_batch: Sequences per micro-batch (b).
        seq: Tokens per sequence (``train.max_length``), the whole row.
        checkpointing: ``parallelism.activation_checkpointing``.
        sp: Sequence-parallel ranks splitting each row (``local_length`` positions of it here).
        tiled_mlp: The MLP runs tiled; it does once a row's share holds more than ``hidden`` positions
            (``tiling.tile_count``).

    Returns:
        Bytes during the backward pass of one micro-batch.
    """
    local = local_length(seq, sp)
    tokens = micro_batch * local
    tiled = tiled_mlp and local > shape.hidden

    def per_token(tiled: bool) -> float:
        return layer_bytes_per_token(shape, seq=local * sp, precision=precision, fused_attention=fused_attention,
                                     frozen_base=frozen_base, device=device, tiled_mlp=tiled)

    layer = tokens * per_token(tiled)
    # backward recomputes the MLP one tile (the flattened rows cut into ceil(local / hidden)) at a time
    tile = micro_batch * local / -(-local // shape.hidden) * (per_token(False) - per_token(True)) if tiled else 0.0
    if checkpointing:
        return float(shape.layers * tokens * shape.hidden * BYTES[precision] + layer + tile)
    return float(shape.layers * layer + tile)


def exchange_bytes(shape: ModelShape, *, micro_batch: int, seq: int, precision: str, sp: int) -> float:
    """Sequence parallelism's all-to-all buffers of one layer's attention, on one rank (0 without it).

    DeepSpeed's ``UlyssesSPAttentionHF`` copies this rank's q, k and v into contiguous send buffers and
    receives as many elements back (k and v replicated to ``sp`` heads when the model has fewer KV heads);
    they are freed once attention has its inputs, and the output's exchange and backward's exchanges of the
    gradients are no larger. One layer at a time, so it counts once.

    Example (b=1, s=8, 4 heads of 2, 2 KV heads, bf16): 4 local positions x (4 + 2 * 2) heads x 2 x 2
    buffers x 2 bytes; at SP 4 the KV heads go to 4.
        >>> s = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=2, hidden=8, heads=4,
        ...                vocab=10, kv_heads=2)
        >>> [exchange_bytes(s, micro_batch=1, seq=8, precision="bf16", sp=p) for p in (1, 2, 4)]
        [0.0, 256.0, 192.0]

    Args:
        shape: ``heads``, ``kv_heads`` and ``head_dim`` are used.
        micro_batch, seq: The micro-batch's sequences and tokens per sequence (the whole row).
        precision: The activation dtype.
        sp: Sequence-parallel ranks.

    Returns:
        Bytes of one layer's send and receive buffers.
    """
    if sp == 1:
        return 0.0
    kv = shape.kv_heads or shape.heads
    head_dim = shape.head_dim or shape.hidden // shape.heads
    elements = micro_batch * local_length(seq, sp) * head_dim * (shape.heads + 2 * max(kv, sp))
    return float(2 * elements * BYTES[precision])


def logits_bytes(shape: ModelShape, *, micro_batch: int, seq: int, precision: str, lm_head: str,
                 chunk_tokens: int, partitioned_head: bool = False) -> float:
    """The LM head's logits and loss buffer of one micro-batch.

    Assumes every position is supervised (the worst case). ``lm_head=supervised`` (sftdist/engine/forward.py)
    gathers the supervised hidden rows and keeps one chunk of at most ``chunk_tokens`` rows of fp32 logits,
    whose storage the cross-entropy's backward reuses for their gradient; ``full`` keeps all logits in the
    model dtype plus their fp32 copy.

    Example (b=2, s=4, vocab 10, hidden 8, fp32): 8 rows of 10 fp32 logits + 8 hidden rows; chunk of 4.
        >>> s = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=1, hidden=8, heads=2,
        ...                vocab=10)
        >>> [logits_bytes(s, micro_batch=2, seq=4, precision="fp32", lm_head="supervised", chunk_tokens=c)
        ...  for c in (8192, 4)]
        [576.0, 416.0]

    Args:
        shape: ``vocab`` and ``hidden`` are used.
        micro_batch, seq: The micro-batch's sequences and tokens per sequence.
        precision: The model dtype (the hidden rows; logits are fp32 for the loss).
        lm_head: ``train.lm_head``.
        chunk_tokens: ``train.loss_chunk_tokens``.
        partitioned_head: ZeRO-3: the head's weight is partitioned, and training computes the whole
            micro-batch's supervised logits in one chunk (``engine/forward.py``: every chunk would gather
            the weight collectively, and ranks with different supervised counts would fall out of step).

    Returns:
        Bytes of the logits and loss buffers of one micro-batch.
    """
    tokens = micro_batch * seq
    if lm_head == "full":
        return float(tokens * shape.vocab * (BYTES[precision] + 4))
    rows = tokens if partitioned_head else min(tokens, chunk_tokens)
    return float(rows * shape.vocab * 4 + tokens * shape.hidden * BYTES[precision])


def retained_bytes(activations: float, device: str) -> float:
    """Memory that stays resident after backward has freed the activations: on CPU, once more the activation
    term; on a GPU nothing beyond the headroom the planner asks for.

    On CPU, tensors up to 32 MiB (glibc's largest dynamic mmap threshold: every activation tensor of a
    micro-batch of a few thousand tokens) come from glibc's heap, which returns memory only from its top.
    What the forward's temporaries and the freed activations occupied stays resident, and the backward's
    gradient temporaries and the next forward cannot reuse all of it (holes of other sizes), so the heap
    settles near twice the activations. Measured on SmolLM2-135M's shape (``bench/plan_rss.py``,
    ``bench/RESULTS.md``): with glibc made to return every freed tensor at once the peak RSS falls by
    1.2-1.25x the activation term under full fine-tuning and by 1.0-1.1x under LoRA; the peak RSS less the
    planner's other terms is 2.0x, 2.1-2.2x and 2.2x the activation term (full, LoRA, ZeRO-3 on 2 ranks).
    Bigger tensors (parameters, optimizer states, DeepSpeed's flat buffers) are mmapped and leave no such
    remainder. A GPU's caching allocator keeps freed blocks too,
    but hands them back to the next tensors of their size; its fragmentation is in the 10-15% headroom.

    Example:
        >>> retained_bytes(1000.0, "cpu"), retained_bytes(1000.0, "gpu")
        (1000.0, 0.0)

    Args:
        activations: The activation term (``activation_bytes``, checkpointed or not, as the run trains).
        device: ``cpu`` or ``gpu``.

    Returns:
        Bytes per rank.
    """
    return float(activations if device == "cpu" else 0.0)
