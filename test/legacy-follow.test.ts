// The legacy MMU's per-GFN picture beside a scenario (src/run/tdp-follow.ts,
// the legacy pair): which host steps are marked untraced (untracedBy), and
// the marking on a real lab trace (Linux 7.2, npt-legacy, the scenario
// madvise_refault), where KVM zaps the page MADV_DONTNEED drops without a
// trace event.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Memslot } from '../src/model/memslots.js';
import { LegacyPicture } from '../src/observe/legacy-picture.js';
import { parsePageFault } from '../src/observe/tdp-picture.js';
import { parseFormat, parseTrace, type EventFormat, type TraceEvent } from '../src/observe/tracefs.js';
import { picturePair, untracedBy } from '../src/run/tdp-follow.js';
import type { Step } from '../src/scenario/types.js';

/** The fixture: the format files, then the trace lines, as the lab's tracefs gave them. */
function labTrace(): TraceEvent[] {
  const text = readFileSync(join(__dirname, 'fixtures', 'lab-trace-npt-legacy-7.2.txt'), 'utf8');
  const [formats, trace] = text.split('=== trace\n');
  const byId = new Map<string, EventFormat>();
  for (const b of formats!.split(/\n(?=name: )/).filter((x) => x.startsWith('name: '))) {
    const name = /^name: (\w+)/.exec(b)![1]!;
    const id = name === 'kvm_page_fault' ? `kvm/${name}` : `kvmmmu/${name}`;
    byId.set(id, parseFormat(id, b));
  }
  return parseTrace(trace!, byId);
}

type HostStep = Extract<Step, { side: 'host' }>;
// madvise_refault's slot 1: 16 pages at GPA 0x1000000.
const slot1: Memslot = {
  slot: 1,
  asId: 0,
  baseGfn: 0x1000,
  npages: 16,
  hva: 0x7f0000000000n,
  flags: { logDirty: false, readonly: false },
  backing: { kind: 'anon', pageSize: 4096 },
} as Memslot;
const slotOf = (n: number) => (n === 1 ? slot1 : undefined);
const step = (s: Record<string, unknown>): HostStep => ({ side: 'host', ...s }) as HostStep;

describe('host steps the legacy MMU carries out untraced', () => {
  it('an invalidation zaps its pages, dirty logging and the dirty-log calls write-protect the slot', () => {
    const dontneed = step({ kind: 'madvise', slot: 1, offset: 0x1000n, size: 0x1000n, advice: 'dontneed' });
    expect(untracedBy(dontneed, slotOf)).toEqual([{ start: 0x1001, end: 0x1002, what: 'zap' }]);
    // munmap splits the VMA at both ends: the 2 MiB around each may be notified (up to 511 GFNs out).
    expect(untracedBy(step({ kind: 'munmap', slot: 1, offset: 0x2000n, size: 0x3000n }), slotOf)).toEqual([
      { start: 0x1002 - 511, end: 0x1005 + 511, what: 'zap' },
    ]);
    expect(untracedBy(step({ kind: 'get-dirty-log', slot: 1 }), slotOf)).toEqual([
      { start: 0x1000, end: 0x1010, what: 'wrprot' },
    ]);
    // MADV_HUGEPAGE drops no page but splits the VMA, which may notify the 2 MiB around each end;
    // KVM_PRE_FAULT_MEMORY faults, which the trace shows.
    expect(untracedBy(step({ ...dontneed, advice: 'hugepage' }), slotOf)).toEqual([
      { start: 0x1001 - 511, end: 0x1002 + 511, what: 'zap' },
    ]);
    expect(untracedBy(step({ kind: 'pre-fault', gpa: 0x1000000n, size: 0x1000n }), slotOf)).toEqual([]);
  });

  it('logging on write-protects the slot, logging off zaps its collapsible leaves; no change, nothing', () => {
    const logging = { ...slot1, flags: { logDirty: true, readonly: false } };
    const flags = step({ kind: 'memslot-flags', slot: 1, logDirty: true });
    const on = untracedBy(flags, () => logging, slotOf);
    expect(on).toEqual([{ start: 0x1000, end: 0x1010, what: 'wrprot' }]);
    expect(untracedBy(flags, slotOf, () => logging)).toEqual([{ start: 0x1000, end: 0x1010, what: 'zap' }]);
    expect(untracedBy(flags, slotOf, slotOf)).toEqual([]);
  });

  it('the legacy pair fits a host with the legacy tracepoints', () => {
    const profile = {
      arch: 'x86_64',
      tdp: { enabled: true, kind: 'npt' },
      tdpMmu: false,
      oracles: {
        tdp_spte_tracepoints: { available: false, why: 'tdp_mmu is off' },
        legacy_spte_tracepoints: { available: true, why: 'yes' },
      },
    } as unknown as Parameters<typeof picturePair>[0];
    expect(picturePair(profile)).toMatchObject({ name: 'legacy MMU', blindFrom: 'host-ops' });
  });
});

describe('untraced marking on a Linux 7.2 lab trace (madvise_refault)', () => {
  const events = labTrace();
  // The guest's read of the dropped page faults again: everything before it is the trace up to the madvise.
  const faults = events.map((e, i) => [parsePageFault(e), i] as const).filter(([f]) => f?.gpa === 0x1001000n);
  const refault = faults[1]![1];

  it('the trace shows the prefetch and the writes, but not the zap of MADV_DONTNEED', () => {
    const p = new LegacyPicture('npt', events.slice(0, refault));
    expect(p.unparsed).toBe(0);
    // The first fault's neighbours the host had written (bring-up's tables) were prefetched writable.
    for (let gfn = 0x11n; gfn <= 0x17n; gfn++) expect(p.leaf(0, gfn)).toMatchObject({ level: 1, writable: true });
    // The page KVM zapped through its rmaps still shows as mapped.
    expect(p.leaf(0, 0x1001n)).toMatchObject({ level: 1, writable: true });
  });

  it('marks exactly the dropped page blind until its refault is traced', () => {
    const p = new LegacyPicture('npt', events.slice(0, refault));
    const dontneed = step({ kind: 'madvise', slot: 1, offset: 0x1000n, size: 0x1000n, advice: 'dontneed' });
    for (const r of untracedBy(dontneed, slotOf)) p.untraced(r.start, r.end, r.what);
    expect([p.blind(0x1000), p.blind(0x1001), p.blind(0x1002)]).toEqual([undefined, 'mapping', undefined]);
    expect(p.mapping(0, 0x1000n)).toMatchObject({ level: 1, writable: true });
    // The refault maps the zero page read-only, the write then a page of its own: both traced.
    const read = events.findIndex((e, i) => i > refault && e.id === 'kvmmmu/kvm_mmu_set_spte');
    p.add(events.slice(refault, read + 1));
    expect(p.blind(0x1001)).toBeUndefined();
    expect(p.mapping(0, 0x1001n)).toEqual({ level: 1, writable: false, executable: true, mmio: false });
    p.add(events.slice(read + 1));
  });

  it('write protection hides only the W bit of mapped pages', () => {
    const p = new LegacyPicture('npt', events.slice(0, refault));
    for (const r of untracedBy(step({ kind: 'get-dirty-log', slot: 1 }), slotOf)) p.untraced(r.start, r.end, r.what);
    expect([p.blind(0x1000), p.blind(0x1002), p.blind(0x1005)]).toEqual(['writable', 'writable', undefined]);
    expect(p.blind(0x10)).toBeUndefined(); // slot 0 is not touched
  });
});
