// The host profile: what KVM is here, and from that, which oracles this host
// offers. Reads sysfs/procfs and asks KVM; changes nothing.
import { kernelBehaviours } from '../model/kernel.js';
import { archOfNode, type Arch } from '../arch/arch.js';
import type { GuestWalker } from '../model/walk.js';
import type { CpuidEntry } from '../kvm/cpuid.js';
import { Kvm } from '../kvm/kvm.js';
import type { HostFs, Target } from '../kvm/target.js';
import { HostError } from '../kvm/sys.js';
import { CAP, type CapName } from '../uapi/uapi.js';

export type Flavour = 'kvm_intel' | 'kvm_amd' | 'kvm_pvm' | 'arm64-vhe' | 'arm64-nvhe' | 'arm64-protected' | 'unknown';
export type TracefsState = 'mounted' | 'mountable' | 'absent';

export const ORACLES = [
  'exits',
  'exception_log',
  'ad_bits',
  'dirty_log',
  'dirty_ring',
  'translate',
  'stats_faults',
  'walker_tracepoints',
  'tdp_spte_tracepoints',
  'legacy_spte_tracepoints',
  'shadow_page_tracepoints',
  'stage2_fault_tracepoints',
] as const;
export type Oracle = (typeof ORACLES)[number];

export interface OracleState {
  available: boolean;
  /** Why it is or is not available here. */
  why: string;
}

export interface CpuFeatures {
  vendor: string;
  /** The processor's name: the brand string (CPUID 0x80000002..4) where KVM reports one, else the host's /proc/cpuinfo model name, e.g. "QEMU TCG CPU version 2.5+" inside the lab. */
  brand: string;
  maxPhyAddr: number;
  linearAddressBits: number;
  nx: boolean;
  smep: boolean;
  smap: boolean;
  pku: boolean;
  la57: boolean;
  pdpe1gb: boolean;
}

export interface HostProfile {
  arch: Arch;
  device: string;
  flavour: Flavour;
  tdp: { enabled: boolean; kind: 'ept' | 'npt' | 'stage2' | 'none' };
  tdpMmu: boolean | null;
  moduleParams: Record<string, string>;
  apiVersion: number;
  capabilities: Record<string, number>;
  maxMemslots: number;
  maxVcpus: number;
  cpu: CpuFeatures | null;
  thp: { enabled: string; defrag: string } | null;
  hugetlb: Record<string, { total: number; free: number }>;
  /** `why`: when tracefs is absent, what keeps it out of reach. */
  tracefs: { state: TracefsState; path: string; events: Record<string, boolean>; why?: string };
  oracles: Record<Oracle, OracleState>;
  /** The kernel's release (`uname -r`) and the release-dependent KVM behaviours the models assume for it (model/kernel.ts). */
  kernel?: { release: string | null; behaviours: ReturnType<typeof kernelBehaviours> };
}

/** A file of the target, trimmed; undefined when it cannot be read. */
const readIn = (fs: HostFs, p: string): string | undefined => fs.read(p)?.trim();

/** The bracketed choice of a sysfs selector like "always [madvise] never". */
const selected = (s: string | undefined) => s?.match(/\[([^\]]+)\]/)?.[1] ?? s ?? 'unknown';

const MEMORY_PARAMS: Record<string, string[]> = {
  kvm: [
    'tdp_mmu',
    'eager_page_split',
    'nx_huge_pages',
    'nx_huge_pages_recovery_ratio',
    'mmio_caching',
    'flush_on_reuse',
    'eager_zap_unsync_children',
    'allow_unsafe_mappings',
  ],
  kvm_intel: ['ept', 'eptad', 'pml', 'unrestricted_guest', 'nested'],
  kvm_amd: ['npt', 'nested', 'avic'],
  kvm_pvm: [],
};

export const TRACE_EVENTS = [
  'kvmmmu/kvm_mmu_pagetable_walk',
  'kvmmmu/kvm_mmu_paging_element',
  'kvmmmu/kvm_mmu_set_accessed_bit',
  'kvmmmu/kvm_mmu_set_dirty_bit',
  'kvmmmu/kvm_mmu_walker_error',
  'kvmmmu/kvm_mmu_get_page',
  'kvmmmu/kvm_mmu_prepare_zap_page',
  'kvmmmu/kvm_tdp_mmu_spte_changed',
  'kvmmmu/kvm_mmu_set_spte',
  'kvmmmu/kvm_mmu_spte_requested',
  'kvmmmu/mark_mmio_spte',
  'kvmmmu/fast_page_fault',
  'kvm/kvm_page_fault',
  'kvm/kvm_mmio',
  'kvm/kvm_guest_fault',
] as const;

/**
 * The KVM flavour. On arm64 the kernel log says which mode KVM initialised
 * in (kvm_arm_init: "VHE mode initialized successfully", "Hyp mode
 * initialized successfully" for nVHE, "Protected nVHE mode initialized
 * successfully"); the command line's kvm-arm.mode is what was asked for, and
 * decides only when the log no longer holds that line.
 */
export function detectFlavour(
  mods: (name: string) => boolean,
  cmdline: string,
  machine: Arch,
  kernelLog?: string,
): Flavour {
  if (machine === 'arm64') {
    const log = kernelLog ?? '';
    if (/Protected nVHE mode initialized successfully/.test(log)) return 'arm64-protected';
    if (/\bVHE mode initialized successfully/.test(log)) return 'arm64-vhe';
    if (/Hyp mode initialized successfully/.test(log)) return 'arm64-nvhe';
    const mode = cmdline.match(/kvm-arm\.mode=(\S+)/)?.[1];
    if (mode === 'protected') return 'arm64-protected';
    if (mode === 'nvhe') return 'arm64-nvhe';
    return 'arm64-vhe';
  }
  for (const f of ['kvm_pvm', 'kvm_intel', 'kvm_amd'] as const) if (mods(f)) return f;
  return 'unknown';
}

export function tracefsState(fs: HostFs, root = '/sys/kernel/tracing'): TracefsState {
  return tracefsReach(fs, root).state;
}

/** CAP_SYS_ADMIN's bit in /proc/self/status's CapEff: mounting tracefs needs it. */
const CAP_SYS_ADMIN = 21n;

/**
 * Whether the target's tracefs is mounted, or this process could mount it,
 * and when neither, why not. Mounting needs root with CAP_SYS_ADMIN in the
 * initial user namespace (tracefs cannot be mounted in another), which a
 * container often lacks even as root; an unreadable /proc/self file counts
 * as no obstacle.
 */
export function tracefsReach(fs: HostFs, root = '/sys/kernel/tracing'): { state: TracefsState; why?: string } {
  if (fs.exists(`${root}/events`)) return { state: 'mounted' };
  const absent = (why: string) => ({ state: 'absent' as const, why });
  if (!(readIn(fs, '/proc/filesystems') ?? '').includes('tracefs')) return absent('the kernel offers no tracefs');
  if (!fs.exists(root)) return absent(`not mounted, and there is no ${root} to mount it on`);
  if (fs.uid() !== 0) return absent('not mounted, and mounting it needs root');
  const capEff = readIn(fs, '/proc/self/status')?.match(/^CapEff:\s*([0-9a-f]+)$/m)?.[1];
  if (capEff !== undefined && ((BigInt(`0x${capEff}`) >> CAP_SYS_ADMIN) & 1n) === 0n) {
    return absent(
      'not mounted, and mounting it needs CAP_SYS_ADMIN, which this process lacks, ' + 'as in a container without it',
    );
  }
  const uidMap = readIn(fs, '/proc/self/uid_map');
  if (uidMap !== undefined && !/^0\s+0\s+4294967295$/.test(uidMap)) {
    return absent('not mounted, and this process runs in a user namespace, where tracefs cannot be mounted');
  }
  return { state: 'mountable' };
}

function cpuFeatures(entries: CpuidEntry[]): CpuFeatures {
  const leaf = (fn: number, idx = 0) => entries.find((e) => e.function === fn && e.index === idx);
  const l0 = leaf(0);
  const vendor = l0 ? Buffer.from(new Uint32Array([l0.ebx, l0.edx, l0.ecx]).buffer).toString('latin1') : 'unknown';
  const l7 = leaf(7);
  const e1 = leaf(0x80000001);
  const e8 = leaf(0x80000008);
  const brandLeaves = [0x80000002, 0x80000003, 0x80000004].map((fn) => leaf(fn));
  const brand = brandLeaves.every((l) => l)
    ? Buffer.from(new Uint32Array(brandLeaves.flatMap((l) => [l!.eax, l!.ebx, l!.ecx, l!.edx])).buffer)
        .toString('latin1')
        .replace(/\0.*$/s, '')
        .trim()
    : '';
  return {
    vendor,
    brand,
    maxPhyAddr: e8 ? e8.eax & 0xff : 36,
    linearAddressBits: e8 ? (e8.eax >> 8) & 0xff : 48,
    nx: !!e1 && ((e1.edx >>> 20) & 1) === 1,
    pdpe1gb: !!e1 && ((e1.edx >>> 26) & 1) === 1,
    smep: !!l7 && ((l7.ebx >>> 7) & 1) === 1,
    smap: !!l7 && ((l7.ebx >>> 20) & 1) === 1,
    pku: !!l7 && ((l7.ecx >>> 3) & 1) === 1,
    la57: !!l7 && ((l7.ecx >>> 16) & 1) === 1,
  };
}

/** Derives the oracle list from the facts; pure so that it can be tested per host kind. */
export function deriveOracles(p: Omit<HostProfile, 'oracles'>): Record<Oracle, OracleState> {
  const yes = (why: string): OracleState => ({ available: true, why });
  const no = (why: string): OracleState => ({ available: false, why });
  const x86 = p.arch === 'x86_64';
  const ev = (name: string) =>
    p.tracefs.state === 'mounted' ? p.tracefs.events[name] === true : p.tracefs.state === 'mountable';
  const tracefsWhy = p.tracefs.state === 'mountable' ? ' (tracefs not mounted; kvmharness mounts it as root)' : '';
  const absent = p.tracefs.why ? `tracefs absent: ${p.tracefs.why}` : 'tracefs absent';
  const softwareWalker = p.flavour === 'kvm_pvm' || !p.tdp.enabled;
  const o = {} as Record<Oracle, OracleState>;
  o.exits = yes('KVM_RUN exit records');
  o.exception_log = x86
    ? yes('guest IDT handlers record vector, error code, CR2 and RIP')
    : no('x86 guest bring-up only');
  o.ad_bits = x86
    ? yes('guest page tables are read back from guest memory after each step')
    : no('x86 guest tables only');
  o.dirty_log = yes('KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG');
  o.dirty_ring =
    (p.capabilities.KVM_CAP_DIRTY_LOG_RING ?? 0) > 0 || (p.capabilities.KVM_CAP_DIRTY_LOG_RING_ACQ_REL ?? 0) > 0
      ? yes(`KVM_CAP_DIRTY_LOG_RING = ${p.capabilities.KVM_CAP_DIRTY_LOG_RING}`)
      : no('KVM_CAP_DIRTY_LOG_RING is 0');
  o.translate = x86 ? yes('KVM_TRANSLATE walks the guest tables') : no('KVM_TRANSLATE is x86 only');
  if (!p.capabilities.KVM_CAP_BINARY_STATS_FD) o.stats_faults = no('no binary stats fd');
  else if (p.flavour === 'kvm_pvm')
    o.stats_faults = no('kvm_pvm: pf_* and pages_* do not count guest accesses (every guest instruction is emulated)');
  else if (p.flavour === 'unknown') o.stats_faults = no('unknown KVM flavour');
  else if (p.arch === 'arm64') o.stats_faults = no('arm64 KVM has no pf_* / pages_* fault statistics');
  else o.stats_faults = yes(`pf_* and pages_* count ${p.tdp.enabled ? 'TDP' : 'shadow'} faults`);
  const walkerEvents = [
    'kvmmmu/kvm_mmu_pagetable_walk',
    'kvmmmu/kvm_mmu_paging_element',
    'kvmmmu/kvm_mmu_walker_error',
  ].every(ev);
  o.walker_tracepoints = !x86
    ? no('x86 software walker only')
    : !walkerEvents
      ? no(p.tracefs.state === 'absent' ? absent : 'kvmmmu walker events missing')
      : yes(
          (softwareWalker
            ? 'KVM walks guest tables in software for every guest access'
            : 'only for emulated accesses and KVM_TRANSLATE') + tracefsWhy,
        );
  o.tdp_spte_tracepoints = !p.tdp.enabled
    ? no('no TDP on this host')
    : p.tdpMmu === false
      ? no('tdp_mmu is off: the legacy MMU does not fire kvm_tdp_mmu_spte_changed')
      : ev('kvmmmu/kvm_tdp_mmu_spte_changed')
        ? yes('kvm_tdp_mmu_spte_changed' + tracefsWhy)
        : no(p.tracefs.state === 'absent' ? absent : 'kvm_tdp_mmu_spte_changed missing');
  const legacyEvents = [
    'kvmmmu/kvm_mmu_set_spte',
    'kvmmmu/mark_mmio_spte',
    'kvmmmu/fast_page_fault',
    'kvmmmu/kvm_mmu_get_page',
    'kvmmmu/kvm_mmu_prepare_zap_page',
  ];
  o.legacy_spte_tracepoints =
    !x86 || !p.tdp.enabled
      ? no('the legacy MMU with TDP only (x86, EPT or NPT)')
      : p.tdpMmu !== false
        ? no('tdp_mmu is on: KVM maps guest memory with the TDP MMU')
        : legacyEvents.every(ev)
          ? yes(
              'kvm_mmu_set_spte, mark_mmio_spte, fast_page_fault, kvm_mmu_get_page, kvm_mmu_prepare_zap_page (leaf zaps and write protection untraced)' +
                tracefsWhy,
            )
          : no(p.tracefs.state === 'absent' ? absent : 'legacy MMU events missing');
  o.stage2_fault_tracepoints =
    p.arch !== 'arm64'
      ? no('arm64 stage-2 only')
      : ev('kvm/kvm_guest_fault')
        ? yes('kvm_guest_fault: every stage-2 abort with its IPA, syndrome and FAR' + tracefsWhy)
        : no(p.tracefs.state === 'absent' ? absent : 'kvm_guest_fault missing');
  o.shadow_page_tracepoints = p.tdp.enabled
    ? no('TDP is on: no shadow pages for guest tables')
    : ev('kvmmmu/kvm_mmu_get_page')
      ? yes('kvm_mmu_get_page / prepare_zap_page for the shadow MMU' + tracefsWhy)
      : no(p.tracefs.state === 'absent' ? absent : 'kvm_mmu_get_page missing');
  return o;
}

/** The profile of the KVM at `device` on `target`. */
export function probe(target: Target, device?: string): HostProfile {
  const fs = target.fs;
  const read = (p: string) => readIn(fs, p);
  const existsSync = (p: string) => fs.exists(p);
  const kvm = Kvm.open(target, device);
  try {
    const node = fs.arch();
    const machine = archOfNode(node);
    if (!machine) throw new HostError(`KVM on ${node}: kvmharness knows x86_64 and arm64 hosts only`);
    const mods = (m: string) => existsSync(`/sys/module/${m}`);
    const flavour = detectFlavour(
      mods,
      read('/proc/cmdline') ?? '',
      machine,
      machine === 'arm64' ? fs.kernelLog?.() : undefined,
    );
    const param = (m: string, p: string) => read(`/sys/module/${m}/parameters/${p}`);
    const moduleParams: Record<string, string> = {};
    for (const [m, ps] of Object.entries(MEMORY_PARAMS)) {
      if (!mods(m)) continue;
      for (const p of ps) {
        const v = param(m, p);
        if (v !== undefined) moduleParams[`${m}.${p}`] = v;
      }
    }
    const yn = (v: string | undefined) => v === 'Y' || v === '1' || v === 'y';
    let tdp: HostProfile['tdp'];
    if (flavour === 'kvm_intel') tdp = { enabled: yn(param('kvm_intel', 'ept')), kind: 'ept' };
    else if (flavour === 'kvm_amd') tdp = { enabled: yn(param('kvm_amd', 'npt')), kind: 'npt' };
    else if (flavour.startsWith('arm64')) tdp = { enabled: true, kind: 'stage2' };
    else tdp = { enabled: false, kind: 'none' };
    if (!tdp.enabled && tdp.kind !== 'stage2') tdp = { enabled: false, kind: 'none' };
    const tdpMmuParam = param('kvm', 'tdp_mmu');
    const vm = kvm.createVm();
    const capabilities: Record<string, number> = {};
    try {
      for (const name of Object.keys(CAP) as CapName[]) capabilities[name] = vm.checkExtension(CAP[name]);
    } finally {
      vm.close();
    }
    const cpu = machine === 'x86_64' ? cpuFeatures(kvm.supportedCpuid()) : null;
    // KVM reports no brand string; under TDP the host's processor walks the guest's tables, so its name is the one that counts.
    if (cpu && !cpu.brand)
      cpu.brand = (read('/proc/cpuinfo') ?? '').match(/^model name\s*:\s*(.*)$/m)?.[1]?.trim() ?? '';
    const thpEnabled = read('/sys/kernel/mm/transparent_hugepage/enabled');
    const hugetlb: HostProfile['hugetlb'] = {};
    const hpDir = '/sys/kernel/mm/hugepages';
    if (existsSync(hpDir)) {
      for (const d of fs.list(hpDir)) {
        const size = d.replace(/^hugepages-/, '');
        hugetlb[size] = {
          total: Number(read(`${hpDir}/${d}/nr_hugepages`) ?? 0),
          free: Number(read(`${hpDir}/${d}/free_hugepages`) ?? 0),
        };
      }
    }
    const { state: tstate, why: tracefsWhy } = tracefsReach(fs);
    const events: Record<string, boolean> = {};
    if (tstate === 'mounted')
      for (const e of TRACE_EVENTS) events[e] = existsSync(`/sys/kernel/tracing/events/${e}/format`);
    const base: Omit<HostProfile, 'oracles'> = {
      arch: machine,
      device: kvm.path,
      flavour,
      tdp,
      tdpMmu: tdpMmuParam === undefined ? null : yn(tdpMmuParam) && tdp.enabled,
      moduleParams,
      apiVersion: kvm.apiVersion(),
      capabilities,
      maxMemslots: capabilities.KVM_CAP_NR_MEMSLOTS ?? 0,
      maxVcpus: capabilities.KVM_CAP_MAX_VCPUS ?? 0,
      cpu,
      thp: thpEnabled
        ? { enabled: selected(thpEnabled), defrag: selected(read('/sys/kernel/mm/transparent_hugepage/defrag')) }
        : null,
      hugetlb,
      tracefs: { state: tstate, path: '/sys/kernel/tracing', events, ...(tracefsWhy ? { why: tracefsWhy } : {}) },
    };
    const release = read('/proc/sys/kernel/osrelease') ?? null;
    const kernel = { release, behaviours: kernelBehaviours(release ?? undefined) };
    return { ...base, oracles: deriveOracles(base), kernel };
  } finally {
    kvm.close();
  }
}

/**
 * Who walks the guest's page tables on this host: KVM's software walker
 * without TDP (and on kvm_pvm, which emulates the guest), the processor under
 * TDP — QEMU's TCG when the processor is QEMU's emulated one (the lab).
 */
export function guestWalkerOf(p: Pick<HostProfile, 'tdp' | 'flavour' | 'cpu'>): GuestWalker {
  if (!p.tdp.enabled || p.flavour === 'kvm_pvm') return 'kvm';
  return /\bQEMU TCG\b/.test(p.cpu?.brand ?? '') ? 'qemu-tcg' : 'cpu';
}
