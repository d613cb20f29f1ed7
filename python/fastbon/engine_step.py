"""The engine's step over its rows: new rows admitted (their first tokens drawn from their prompts' logits), one
decode forward over every live row (float64 models: with the shadow rows that keep the attention on its matrix
path), and the tokens recorded before the policies run (``fastbon.engine_policies``). A part of ``fastbon.Engine``."""

from collections import Counter

import torch

from .rows import Row, step_inputs

# csrc/cpu/attention_item.cpp's kGemmRows: a block read by fewer query rows takes the few-rows path.
SHARED_QUERY_ROWS = 4


def shared_block_rows(model) -> int:
    """The live rows each prompt block must be read by for a row's bits not to depend on who shares its block.
    The cpu attention reads a block with fewer than ``SHARED_QUERY_ROWS`` query rows on a few-rows path and with
    more on a matrix path; accumulating in float (float32, bfloat16, float16 models) both do the same operations in
    the same order (csrc/cpu/attention_rows.h), so one row is enough. In float64 they still round differently: a
    block needs enough rows for the matrix path, and the engine adds shadow rows where it lacks them."""
    if model.get_output_embeddings().weight.dtype != torch.float64:
        return 1
    config = model.get_text_config() if hasattr(model, "get_text_config") else model.config
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return -(-SHARED_QUERY_ROWS // max(1, group))


class EngineStep:
    """``fastbon.Engine``'s rows and decode step (the engine's state is the instance's: see ``Engine``)."""

    # --- rows in ------------------------------------------------------------------------------------------------
    def _admit_rows(self) -> None:
        """Prefilled requests' pending samples become rows, oldest request first, while rows and blocks allow;
        each row's first token is drawn from its prompt's logits."""
        for request in list(self.prefilling):
            if request.first_logits is None:
                break
            whole = request.config.prune is not None or request.search is not None
            room = self.max_rows - len(self.rows)
            count = len(request.pending) if whole else min(room, len(request.pending))
            if count == 0 or count > room:
                break
            admitted = []
            for sample in request.pending[:count]:
                if not self.pool.can_allocate(1 + self.row_blocks):
                    self.prefix_cache.evict(1 + self.row_blocks)
                if not self.pool.can_allocate(1 + self.row_blocks):
                    break
                self.pool.reserved += self.row_blocks
                admitted.append(Row(request, sample, [self.allocate_block()]))
            if not admitted or (whole and len(admitted) < count):
                for row in admitted:
                    self._release_row(row)
                if not self.rows:  # nothing will free memory: the request can never run
                    self._fail(request, MemoryError(
                        f"request {request.id}: {'all ' if whole else ''}{count if whole else 1} sample row(s) do "
                        f"not fit in max_memory beside its prompt's KV (a row holds {self.row_blocks + 1} blocks of "
                        f"{self.pool.block_bytes / 2**20:.2f} MiB at least, the pool {self.pool.max_blocks}); raise "
                        "max_memory or lower n, max_rows or the prompt's length"))
                break
            del request.pending[:len(admitted)]
            if request not in self.decoding:
                self.decoding.append(request)
            if not request.pending:
                self.prefilling.remove(request)
            self._first_tokens(request, admitted)
            if request.pending:
                break

    def _first_tokens(self, request, rows: list) -> None:
        inputs = step_inputs(rows, self.device, first=True)
        tokens, logprobs, top = self.decoder.sample_rows(request.first_logits[None], inputs,
                                                         torch.zeros(len(rows), dtype=torch.int64,
                                                                     device=self.device))
        self.rows.extend(rows)
        self._record(rows, tokens, logprobs, top)

    # --- the decode step ----------------------------------------------------------------------------------------
    def _decode(self) -> None:
        from .engine_policies import make_room

        if not make_room(self):
            return
        rows = self.rows
        shadows = self._shadow_paths(rows)
        padded = -(-(len(rows) + len(shadows)) // self.row_multiple) * self.row_multiple
        levels = max(len(row.request.prompt_blocks) + len(row.blocks) for row in rows)
        if self.decoder.compiled is not None:  # a few static shapes: powers of two of rows and of levels
            padded = max(padded, 1 << (len(rows) - 1).bit_length())
            padded = -(-padded // self.row_multiple) * self.row_multiple
            levels = 1 << (levels - 1).bit_length()
        write_blocks, write_offsets = [row.blocks[-1] for row in rows], [row.write_offset() for row in rows]
        # Each row's block holds this step's key when attention runs: its length counts it.
        self.pool.lens[torch.tensor(write_blocks)] = torch.tensor(write_offsets, dtype=torch.int32).to(
            self.device) + 1
        self.cache.set_rows([row.path() for row in rows], write_blocks, write_offsets, padded, levels, shadows)
        inputs = step_inputs(rows, self.device)
        try:
            logits = self.decoder.forward(self.cache, inputs, padded)
            tokens, logprobs, top = self.decoder.sample_rows(logits, inputs)
        except Exception as error:  # the step's requests share the forward: each gets the error
            for request in {row.request for row in rows}:
                self._fail(request, error)
            return
        self.counters["decode_steps"] += 1
        self.counters["peak_kv_bytes"] = max(self.counters["peak_kv_bytes"], self.pool.nbytes())
        self._record(list(rows), tokens, logprobs, top)

    def _shadow_paths(self, rows: list) -> list:
        """Padding rows that read prompt blocks too few live rows read (float64 models only: see
        ``shared_block_rows``). There the cpu attention's matrix path and few-rows path round differently: a prompt
        block read by one row alone, and by two when another request shares it (or while the request's rows are
        admitted in parts), would give that row other bits. With every prompt block read by enough rows, the matrix
        path serves them all, whatever else runs."""
        readers = Counter(block for row in rows for block in row.request.prompt_blocks)
        shadows, seen = [], set()
        for row in rows:
            request = row.request
            if request.id in seen or not request.prompt_blocks:
                continue
            seen.add(request.id)
            lacking = self.rows_per_shared_block - min(readers[block] for block in request.prompt_blocks)
            shadows.extend([list(request.prompt_blocks)] * max(0, lacking))
        return shadows

    def _record(self, rows: list, tokens, logprobs, top) -> None:
        """Store each row's new token; then the policies: NaN, EOS, length, stop strings, pruning, forks."""
        from .engine_policies import after_step

        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        top_ids = top.indices.tolist() if top is not None else None
        top_values = top.values.tolist() if top is not None else None
        top_row = 0
        for index, row in enumerate(rows):
            sample = row.sample_state()
            sample.tokens.append(tokens[index])
            sample.logprobs.append(logprobs[index])
            if row.request.config.top_logprobs:
                count = row.request.config.top_logprobs
                sample.top_ids.append(top_ids[top_row][:count])
                sample.top_logprobs.append(top_values[top_row][:count])
                top_row += 1
            if row.seen is not None:
                row.seen[tokens[index]] = True
            row.request.stats["tokens_generated"] += 1
        self.counters["tokens_generated"] += len(rows)
        after_step(self, rows)
