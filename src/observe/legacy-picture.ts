// KVM's mappings under the legacy MMU with TDP (kvm.tdp_mmu=0), rebuilt GFN
// by GFN from the tracepoints that MMU fires, with the same leaf() answer as
// TdpPicture (tdp-picture.ts):
//   kvm_mmu_set_spte          every leaf a fault or a prefetch installs
//                             (mmu_set_spte): "gfn G spte S (rwxu) level L at P";
//   mark_mmio_spte            an MMIO SPTE at 4 KiB: "sptep:P gfn G access A gen N";
//   fast_page_fault           the fast path's fix, with the old and new SPTE
//                             ("gva A ... old 0xO new N spurious 0 fixed 1");
//   kvm_mmu_get_page          a direct shadow page (a table) about to be linked:
//                             the huge leaf over its range is gone;
//   kvm_mmu_prepare_zap_page  a shadow page zapped, with all it maps.
//
// What these tracepoints cannot see, and how the picture says so (blind()):
// - leaves zapped one by one through the rmaps: MMU-notifier invalidations
//   (munmap, MADV_DONTNEED, mprotect), the zap of collapsible leaves when
//   dirty logging stops (kvm_mmu_zap_collapsible_spte), kvm_zap_gfn_range;
//   the children of a zapped shadow page are not traced one by one either,
//   but a zapped page is, and its range goes as a whole;
// - write protection (dirty logging on, KVM_GET_DIRTY_LOG /
//   KVM_CLEAR_DIRTY_LOG re-protection) and D-bit clearing;
// - a huge leaf replaced by a table (link_shadow_page): seen only through the
//   kvm_mmu_get_page that precedes it; a reused ("existing") shadow page
//   brings back whatever leaves it kept, which the trace never showed gone.
// The caller reports each host operation that may change SPTEs untraced
// (untraced()); the GFNs it covers stay blind to that aspect until a traced
// event sets their mapping again. Address space 0 only: these events carry
// no address-space id.
import { PAGES } from '../model/spte.js';
import { parseShadowEvent } from './shadow-mmu.js';
import { decodeTdpSpte, X86_SPTE, type ObservedMapping, type TdpFlavour, type TdpMapping } from './tdp-picture.js';
import type { TraceEvent } from './tracefs.js';

export const LEGACY_SPTE_EVENTS = [
  'kvmmmu/kvm_mmu_set_spte',
  'kvmmmu/mark_mmio_spte',
  'kvmmmu/fast_page_fault',
  'kvmmmu/kvm_mmu_get_page',
  'kvmmmu/kvm_mmu_prepare_zap_page',
] as const;

/** What the trace cannot tell about a GFN: whether it is mapped at all, or only its W bit. */
export type Blind = 'mapping' | 'writable';

/** What a host operation may have changed without a trace event. */
export type Untraced = 'zap' | 'wrprot';

const SET_SPTE = /\bgfn ([0-9a-f]+) spte ([0-9a-f]+) \([^)]*\) level (\d+)/;
const MMIO = /\bgfn ([0-9a-f]+) access/;
const FAST = /\bgva ([0-9a-f]+) .*\bnew ([0-9a-f]+) spurious \d+ fixed (\d+)/;

/** The per-GFN picture of the legacy MMU's leaves (address space 0). */
export class LegacyPicture {
  /** Leaf SPTEs by level, then by first GFN. */
  private readonly sptes = [0, 1, 2, 3, 4, 5].map(() => new Map<number, bigint>());
  private readonly mmio = new Set<number>();
  private readonly blindness = new Map<number, Blind>();
  /** Events the picture could not parse (a kernel whose format it does not know). */
  unparsed = 0;

  constructor(
    readonly flavour: TdpFlavour,
    events: Iterable<TraceEvent> = [],
  ) {
    this.add(events);
  }

  add(events: Iterable<TraceEvent>): void {
    for (const e of events) {
      switch (e.id) {
        case 'kvmmmu/kvm_mmu_set_spte': {
          const m = SET_SPTE.exec(e.text);
          if (!m) this.unparsed++;
          else this.set(Number.parseInt(m[1]!, 16), Number(m[3]), BigInt(`0x${m[2]}`));
          break;
        }
        case 'kvmmmu/mark_mmio_spte': {
          const m = MMIO.exec(e.text);
          if (!m) this.unparsed++;
          else {
            const gfn = Number.parseInt(m[1]!, 16);
            this.drop(gfn, gfn + 1, 1);
            this.mmio.add(gfn);
            this.blindness.delete(gfn);
          }
          break;
        }
        case 'kvmmmu/fast_page_fault': {
          const m = FAST.exec(e.text);
          if (!m) this.unparsed++;
          else if (m[3] === '1') this.fastFix(Number(BigInt(`0x${m[1]}`) >> 12n), BigInt(`0x${m[2]}`));
          break;
        }
        case 'kvmmmu/kvm_mmu_get_page':
        case 'kvmmmu/kvm_mmu_prepare_zap_page': {
          const sp = parseShadowEvent(e);
          if (!sp) this.unparsed++;
          else if (sp.direct) this.shadowPage(sp.kind, Number(sp.gfn), sp.level, sp.created);
          break;
        }
      }
    }
  }

  /**
   * A host operation over [start, end) that changes SPTEs without a trace
   * event: after a zap the GFNs' mappings are unknown, after write
   * protection their W bit is, until a traced event sets them again.
   */
  untraced(start: number, end: number, what: Untraced): void {
    for (let gfn = start; gfn < end; gfn++) {
      if (what === 'zap') this.blindness.set(gfn, 'mapping');
      else if (this.blindness.get(gfn) !== 'mapping' && this.leaf(0, BigInt(gfn))) this.blindness.set(gfn, 'writable');
    }
  }

  /** What the trace cannot tell about `gfn`; undefined when leaf() is the whole truth. */
  blind(gfn: number): Blind | undefined {
    return this.blindness.get(gfn);
  }

  /** The present leaf that maps `gfn` as the trace left it (the lowest level first), or undefined. */
  leaf(asId: number, gfn: bigint, maxLevel = 5): (TdpMapping & { level: number }) | undefined {
    if (asId !== 0) return undefined;
    const g = Number(gfn);
    for (let level = 1; level <= maxLevel; level++) {
      const spte = this.sptes[level]!.get(g - (g % PAGES[level]!));
      if (spte === undefined) continue;
      const m = decodeTdpSpte(spte, level, this.flavour);
      if (m.leaf) return { ...m, level };
    }
    return undefined;
  }

  /** What maps `gfn` as the trace left it: an MMIO SPTE or the present leaf (as TdpPicture.mapping). */
  mapping(asId: number, gfn: bigint, maxLevel = 5): ObservedMapping | undefined {
    if (asId !== 0) return undefined;
    if (this.mmio.has(Number(gfn))) return { level: 1, writable: false, executable: false, mmio: true };
    const l = this.leaf(asId, gfn, maxLevel);
    return l && { level: l.level, writable: l.writable, executable: l.executable, mmio: false };
  }

  /** The GFN ranges [start, end) a leaf or an MMIO SPTE of the trace covers (address space 0). */
  *spans(asId: number): Generator<[bigint, bigint]> {
    if (asId !== 0) return;
    for (let level = 1; level < this.sptes.length; level++)
      for (const [gfn, spte] of this.sptes[level]!)
        if (decodeTdpSpte(spte, level, this.flavour).leaf) yield [BigInt(gfn), BigInt(gfn + PAGES[level]!)];
    for (const gfn of this.mmio) yield [BigInt(gfn), BigInt(gfn + 1)];
  }

  /** Whether the trace shows an MMIO SPTE for `gfn`. */
  isMmio(gfn: number): boolean {
    return this.mmio.has(gfn);
  }

  /** mmu_set_spte at (gfn, level): what was below it is unreachable, a huge leaf above it was zapped to link the table. */
  private set(gfn: number, level: number, spte: bigint): void {
    this.drop(gfn, gfn + PAGES[level]!, level - 1);
    for (let l = level + 1; l < this.sptes.length; l++) this.sptes[l]!.delete(gfn - (gfn % PAGES[l]!));
    this.sptes[level]!.set(gfn, spte);
    for (let g = gfn; g < gfn + PAGES[level]!; g++) {
      this.mmio.delete(g);
      this.blindness.delete(g);
    }
  }

  /** fast_pf_fix_direct_spte: the leaf covering gfn gets the new value (its level is the one the picture holds). */
  private fastFix(gfn: number, spte: bigint): void {
    for (let level = 1; level < this.sptes.length; level++) {
      const base = gfn - (gfn % PAGES[level]!);
      if (!this.sptes[level]!.has(base)) continue;
      this.sptes[level]!.set(base, spte);
      for (let g = base; g < base + PAGES[level]!; g++)
        if (this.blindness.get(g) === 'writable') this.blindness.delete(g);
      return;
    }
    // Not in the picture: the level is known only for a 4 KiB leaf.
    if ((spte & X86_SPTE.large) === 0n && this.blindness.get(gfn) !== 'mapping') this.sptes[1]!.set(gfn, spte);
    else this.blindness.set(gfn, 'mapping');
  }

  /**
   * kvm_mmu_get_page of a direct page of `level` at `gfn`: it is linked
   * next, so a huge leaf above its range is gone; a reused page keeps
   * leaves the trace may not have seen go. kvm_mmu_prepare_zap_page: the
   * page's range is unmapped, unless a huge leaf above had replaced it.
   */
  private shadowPage(kind: string, gfn: number, level: number, created: boolean | undefined): void {
    const span = PAGES[level + 1] ?? Infinity;
    if (kind === 'get') {
      for (let l = level + 1; l < this.sptes.length; l++) this.sptes[l]!.delete(gfn - (gfn % PAGES[l]!));
      if (created === false && level < 4) for (let g = gfn; g < gfn + span; g++) this.blindness.set(g, 'mapping');
      return;
    }
    if (kind !== 'zap') return;
    for (let l = level + 1; l < this.sptes.length; l++) if (this.sptes[l]!.has(gfn - (gfn % PAGES[l]!))) return;
    this.drop(gfn, gfn + span, level);
    for (const g of [...this.blindness.keys()]) if (g >= gfn && g < gfn + span) this.blindness.delete(g);
    for (const g of [...this.mmio]) if (g >= gfn && g < gfn + span) this.mmio.delete(g);
  }

  /** Forget the leaves at levels 1..top inside [start, end). */
  private drop(start: number, end: number, top: number): void {
    for (let l = 1; l <= top; l++)
      for (const g of [...this.sptes[l]!.keys()]) if (g >= start && g < end) this.sptes[l]!.delete(g);
  }
}
