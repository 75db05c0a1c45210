// The per-GFN picture of KVM's host-dimension mappings for the MMU a host
// runs, chosen from the probe's facts like the model (model/vm.ts
// tdpModelFor): TdpPicture over kvm_tdp_mmu_spte_changed for the TDP MMU,
// LegacyPicture over the legacy MMU's events under kvm.tdp_mmu=0. Both
// answer leaf(); blind() says what the trace could not see (never anything
// for the TDP MMU's picture, whose own blind spots are documented in
// tdp-picture.ts and left to its callers).
import { tdpMmuOf, type MmuFacts, type TdpMmu } from '../model/vm.js';
import { LEGACY_SPTE_EVENTS, LegacyPicture, type Blind, type Untraced } from './legacy-picture.js';
import { TdpPicture, type ObservedMapping, type TdpFlavour, type TdpMapping } from './tdp-picture.js';
import type { TraceEvent } from './tracefs.js';

export interface SptePicture {
  readonly flavour: TdpFlavour;
  add(events: Iterable<TraceEvent>): void;
  leaf(asId: number, gfn: bigint, maxLevel?: number): (TdpMapping & { level: number }) | undefined;
  /** What maps gfn: the present leaf or an MMIO SPTE. */
  mapping(asId: number, gfn: bigint, maxLevel?: number): ObservedMapping | undefined;
  /** The GFN ranges a leaf or MMIO SPTE of the trace covers, possibly stale. */
  spans(asId: number): Iterable<[bigint, bigint]>;
  /** What the trace cannot tell about gfn (address space 0). */
  blind(gfn: number): Blind | undefined;
  /** A host operation over [start, end) that may change SPTEs untraced. */
  untraced(start: number, end: number, what: Untraced): void;
}

export interface SpteObserver {
  mmu: TdpMmu;
  /** The tracepoints to enable. */
  events: readonly string[];
  /** The oracle of the probe that says whether they are there. */
  oracle: 'tdp_spte_tracepoints' | 'legacy_spte_tracepoints';
  picture(events?: Iterable<TraceEvent>): SptePicture;
}

/** The TDP MMU's picture: its tracepoint shows every change the comparisons rely on (tdp-picture.ts). */
class TdpSptePicture extends TdpPicture implements SptePicture {
  blind(): Blind | undefined {
    return undefined;
  }
  untraced(): void {}
}

export function tdpObserverFor(facts: MmuFacts): SpteObserver {
  const flavour: TdpFlavour = facts.tdp.kind === 'ept' ? 'ept' : 'npt';
  if (tdpMmuOf(facts) === 'legacy')
    return {
      mmu: 'legacy',
      events: LEGACY_SPTE_EVENTS,
      oracle: 'legacy_spte_tracepoints',
      picture: (events) => new LegacyPicture(flavour, events),
    };
  return {
    mmu: 'tdp',
    events: ['kvmmmu/kvm_tdp_mmu_spte_changed'],
    oracle: 'tdp_spte_tracepoints',
    picture: (events) => new TdpSptePicture(flavour, events),
  };
}
