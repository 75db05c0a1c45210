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

// Each field is found on its own: kernels differ in what else the line
// holds (6.1 prints "N-byte qQ" after the level; later kernels print other
// role bits, and the access gains a read bit), and the fields read here keep
// their spelling otherwise.
const FIELD = {
  gfn: /\bgfn ([0-9a-f]+)\b/,
  level: /\bl(\d)\b/,
  // "wux" up to 6.x; later kernels print a read bit first ("rwux").
  access: /\s[r-]?([w-])([u-])([x-])(?=\s)/,
  root: /\broot (\d+)\b/,
  sync: /\b(unsync|sync)\b/,
  created: /\b(new|existing)\s*$/,
};

/** Parses one shadow-page event's text; undefined for other events or text it does not know. */
export function parseShadowEvent(e: TraceEvent): ObservedSp | undefined {
  const kind = KINDS[e.id];
  if (!kind) return undefined;
  const gfn = FIELD.gfn.exec(e.text);
  const level = FIELD.level.exec(e.text);
  const access = FIELD.access.exec(e.text);
  const root = FIELD.root.exec(e.text);
  const sync = FIELD.sync.exec(e.text);
  if (!gfn || !level || !access || !root || !sync) return undefined;
  return {
    kind,
    gfn: BigInt(`0x${gfn[1]}`),
    level: Number(level[1]),
    direct: /\sdirect\b/.test(e.text),
    access: (access[1] === 'w' ? 2 : 0) | (access[2] === 'u' ? 4 : 0) | (access[3] === 'x' ? 1 : 0),
    invalid: /\sinvalid\b/.test(e.text),
    rootCount: Number(root[1]),
    unsync: sync[1] === 'unsync',
    ...(kind === 'get' ? { created: FIELD.created.exec(e.text)?.[1] === 'new' } : {}),
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
