"""The rest of an epoch-mode epoch, from the loader states of a run at another world size.

An epoch is one global sequence of samples (:func:`loader.epoch_order`), cut into contiguous ranges per rank and
worker (:func:`loader.epoch_plan`). A worker reads its segments in order, up to ``interleave_shards`` at a time, each
from its start, so what it has read is: the segments it opened and closed, and a prefix of each open one. Its saved
state holds exactly that (``next_segment`` and the open slots with their ``consumed`` counts). Recomputing every old
worker's plan and taking those away leaves the samples no old rank read, in global order; cutting them with the
same rule over the new ranks and workers reads each of them once.
"""
from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.loader import STATE_VERSION, Piece, WebDatasetStream, _iterator_states, epoch_order, epoch_plan

__all__ = ['rest_of_epoch']

_SAME_ON_EVERY_RANK = ('epoch', 'epoch_consumed', 'epoch_rest', 'batch_size', 'drop_last', 'num_workers')


def _unread(plan: list[Piece], worker_state: dict, where: str) -> list[Piece]:
    """The pieces of one worker's ``plan`` that its saved iterator state had not read."""
    next_segment = worker_state['next_segment']
    # slot fields: (url, source, start, stop, consumed, ...)
    open_slots = {(slot[0], slot[2], slot[3]): slot[4] for slot in worker_state['slots']}
    opened = {(url, start, stop) for url, start, stop, _, _ in plan[:next_segment]}
    if next_segment > len(plan) or not open_slots.keys() <= opened:
        raise ValueError(f'{where}: the saved position does not fit the recomputed plan of its epoch (open '
                         f'{sorted(open_slots)}, {next_segment} of {len(plan)} segments started)')
    unread = []
    for i, (url, start, stop, source, ends_shard) in enumerate(plan):
        if i >= next_segment:
            unread.append((url, start, stop, source, ends_shard))
        elif (url, start, stop) in open_slots and start + open_slots[url, start, stop] < stop:
            unread.append((url, start + open_slots[url, start, stop], stop, source, ends_shard))
        # else: opened and closed (read to its end, or unreadable and counted as skipped)
    return unread


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of one shard as one (the state stays one entry per gap)."""
    out: list[Piece] = []
    for piece in pieces:
        if out and out[-1][0] == piece[0] and out[-1][2] == piece[1] and out[-1][3] == piece[3]:
            out[-1] = (piece[0], out[-1][1], piece[2], piece[3], piece[4])
        else:
            out.append(piece)
    return out


def rest_of_epoch(ds: WebDatasetStream, states: Sequence[dict]) -> tuple[int, list[Piece], int]:
    """``(epoch, rest, consumed)`` for :meth:`WebDatasetStream.set_epoch`: the epoch the saved run was in, the pieces
    ``(url, start, stop, source, ends_shard)`` of it that none of its workers had read, in the epoch's global order,
    and the count of samples of the epoch read before (earlier resizes included).

    In: ``ds``, this run's dataset (epoch mode; same sources and seed as the saved run), and ``states``, the
    ``WebDatasetLoader.state_dict()`` of every rank of the saved run, in rank order. Raises ValueError naming the
    state and key when they cannot be mapped."""
    if ds.mode != 'epoch':
        raise ValueError(f'the rest of an epoch from saved positions is for epoch mode, not {ds.mode!r}')
    if not states:
        raise ValueError('no saved loader states')
    metas = [state['data_pipelines'] for state in states]
    first, world_size = metas[0], len(states)
    for rank, meta in enumerate(metas):
        where = f'loader state {rank}'
        if meta.get('version') != STATE_VERSION or 'batch_size' not in meta:
            raise ValueError(f'{where}: saved by another version of the loader (no batch size): its plan cannot be '
                             'recomputed')
        if meta['mode'] != 'epoch':
            raise ValueError(f'{where}: mode {meta["mode"]!r}, this loader runs epoch mode')
        if (meta['rank'], meta['world_size']) != (rank, world_size):
            raise ValueError(f'{where}: saved by rank {meta["rank"]} of {meta["world_size"]}; need the states of all '
                             f'{world_size} ranks, in rank order')
        if meta['seed'] != ds.seed or meta['fingerprint'] != ds.fingerprint:
            raise ValueError(f'{where}: saved with another seed ({meta["seed"]}, now {ds.seed}) or other sources '
                             f'(fingerprint {meta["fingerprint"]}, now {ds.fingerprint})')
        for key in _SAME_ON_EVERY_RANK:
            if meta.get(key) != first.get(key):
                raise ValueError(f'{where}: {key} {meta.get(key)!r} differs from rank 0\'s {first.get(key)!r}')
    epoch, consumed_before, batch_size = first['epoch'], first.get('epoch_consumed', 0), first['batch_size']
    pieces = first['epoch_rest'] if first['epoch_rest'] is not None else epoch_order(ds.shards, seed=ds.seed,
                                                                                      epoch=epoch)
    plan_workers = max(first['num_workers'], 1)  # num_workers=0 reads in the main process, as one worker
    unread: list[Piece] = []
    read = 0
    for rank, state in enumerate(states):
        workers = {it['worker_id']: it for it in _iterator_states(state['stateful_dataloader'])}
        if sorted(workers) != list(range(plan_workers)):
            raise ValueError(f'loader state {rank}: worker positions {sorted(workers)}, expected '
                             f'{list(range(plan_workers))}')
        for worker_id in range(plan_workers):
            plan = epoch_plan(ds.shards, seed=ds.seed, epoch=epoch, rank=rank, world_size=world_size,
                              worker_id=worker_id, num_workers=plan_workers, batch_size=batch_size,
                              drop_last=first['drop_last'], rest=pieces)
            it = workers[worker_id]
            # A position of another pass (the one before a set_epoch, not yet iterated) has read none of this one.
            this_pass = it['epoch'] == epoch and it.get('consumed', 0) == consumed_before
            left = _unread(plan, it, f'loader state {rank} worker {worker_id}') if this_pass else plan
            read += sum(stop - start for _, start, stop, _, _ in plan) - sum(stop - start for _, start, stop, _, _
                                                                               in left)
            unread.extend(left)
    return epoch, _merge(unread), consumed_before + read
