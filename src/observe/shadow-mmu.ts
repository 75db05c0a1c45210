// The shadow MMU's tracepoints and stats as plain records: the shadow-page
// events (kvm_mmu_get_page, kvm_mmu_unsync_page, kvm_mmu_sync_page,
// kvm_mmu_prepare_zap_page: all print "sp gen G gfn X lL N-byte qQ [direct]
// ACC [invalid] [!]nxe [!]ad root R sync|unsync", get_page adds new|existing),
// the picture of shadow pages they add up to, and the shadow MMU's VM stats.

import type { TraceEvent } from './tracefs.js';

export const SHADOW_EVENTS = [
  'kvmmmu/kvm_mmu_get_page',
  'kvmmmu/kvm_mmu_unsync_page',
  'kvmmmu/kvm_mmu_sync_page',
  'kvmmmu/kvm_mmu_prepare_zap_page',
] as const;

export const SHADOW_STATS = [
  'mmu_unsync',
  'mmu_shadow_zapped',
  'mmu_pte_write',
  'mmu_flooded',
  'mmu_cache_miss',
] as const;

const KINDS: Record<string, ObservedSp['kind']> = {
  'kvmmmu/kvm_mmu_get_page': 'get',
  'kvmmmu/kvm_mmu_unsync_page': 'unsync',
  'kvmmmu/kvm_mmu_sync_page': 'sync',
  'kvmmmu/kvm_mmu_prepare_zap_page': 'zap',
};

export interface ObservedSp {
  kind: 'get' | 'unsync' | 'sync' | 'zap';
  gfn: bigint;
  level: number;
  direct: boolean;
  /** ACC_* bits: x 1, w 2, u 4. */
  access: number;
  invalid: boolean;
  rootCount: number;
  unsync: boolean;
  /** get_page only: a new page rather than one found. */
  created?: boolean;
}

const SP_RE =
  /gfn ([0-9a-f]+) l(\d) \d-byte q\d( direct)? ([w-])([u-])([x-])( invalid)? !?nxe !?ad root (\d+) (sync|unsync)(?: (new|existing))?/;

/** Parses one shadow-page event's text; undefined for other events or text it does not know. */
export function parseShadowEvent(e: TraceEvent): ObservedSp | undefined {
  const kind = KINDS[e.id];
  const m = SP_RE.exec(e.text);
  if (!kind || !m) return undefined;
  return {
    kind,
    gfn: BigInt(`0x${m[1]}`),
    level: Number(m[2]),
    direct: !!m[3],
    access: (m[4] === 'w' ? 2 : 0) | (m[5] === 'u' ? 4 : 0) | (m[6] === 'x' ? 1 : 0),
    invalid: !!m[7],
    rootCount: Number(m[8]),
    unsync: m[9] === 'unsync',
    ...(kind === 'get' ? { created: m[10] === 'new' } : {}),
  };
}

/**
 * The shadow pages the events add up to, by "gfn@level[ direct]": a get
 * adds one, a zap removes it, unsync and sync set its state (each event is
 * recorded before KVM changes the state, so the state is the event's kind).
 */
export class ShadowPicture {
  readonly pages = new Map<string, { unsync: boolean }>();

  add(e: ObservedSp): void {
    const k = `${e.gfn.toString(16)}@${e.level}${e.direct ? ' direct' : ''}`;
    if (e.kind === 'get') this.pages.set(k, { unsync: this.pages.get(k)?.unsync ?? e.unsync });
    else if (e.kind === 'zap') this.pages.delete(k);
    else if (this.pages.has(k)) this.pages.set(k, { unsync: e.kind === 'unsync' });
  }

  /** "gfn@level[ direct][ unsync]", sorted. */
  list(): string[] {
    return [...this.pages].map(([k, v]) => `${k}${v.unsync ? ' unsync' : ''}`).sort();
  }
}
