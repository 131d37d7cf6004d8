"""The data stage: raw records to masked, packed micro-batches. Pure functions, tested without a process group.

- ``build``: the single entry point (``build_datasets``: config -> ``TrainData``; ``build_schedule``).
- ``sources``: read one source's raw records (local files and folders, or the hub).
- ``messages``: every supported format to validated conversations or plain text (``DataError``).
- ``detect``: which known format a record looks like (the fix a missing-field error names; ``format: auto``).
- ``template_shape``, ``reply_spans``: what a chat template puts around a reply, and where each reply is.
- ``tokenize``: render with the tokenizer's own template and label exactly the trained tokens.
- ``split_turns``: one sample per reply, as at inference, for conversations a template renders otherwise.
- ``mask_rules``, ``audit``: the rules masks must obey, checked independently before any model loads.
- ``prepare``: tokenise and mask one source into an on-disk cache keyed by everything that affects it, in flat
  memory (``cache_files``: raw and sample shards on disk; ``encode``: one record or a batch to samples;
  ``encode_pool``: forked workers over ranges of the raw file).
- ``stream_reader``, ``streaming``: sources with ``streaming: true``, read, tokenised, mixed and packed on the
  fly by each rank, with a state that resumes exactly.
- ``quality``: detectors of data problems (duplicates, empty replies, ...).
- ``packing``, ``loader``, ``collate``: bin packing, the deterministic mixed sample order, micro-batches.
- ``batches``: this rank's collated micro-batches of a step, from the schedule or a stream.
- ``demo``: the built-in offline demo data and tokenizer.

``sftdist.data.encode_conversation`` is public: outside tools call it.
"""

from sftdist.data.tokenize import encode_conversation

__all__ = ["encode_conversation"]
