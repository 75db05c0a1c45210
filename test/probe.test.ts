import { describe, expect, it } from 'vitest';
import { deriveOracles, detectFlavour, tracefsReach, type HostProfile } from '../src/probe/probe.js';
import type { HostFs } from '../src/kvm/target.js';
import { archOfNode } from '../src/arch/arch.js';
import { formatProfile, profileJson } from '../src/report/profile.js';

type Base = Omit<HostProfile, 'oracles'>;
const base: Base = {
  arch: 'x86_64',
  device: '/dev/kvm',
  flavour: 'kvm_pvm',
  tdp: { enabled: false, kind: 'none' },
  tdpMmu: false,
  moduleParams: {},
  apiVersion: 12,
  capabilities: { KVM_CAP_BINARY_STATS_FD: 1, KVM_CAP_DIRTY_LOG_RING: 1 << 20 },
  maxMemslots: 32764,
  maxVcpus: 1024,
  cpu: null,
  thp: null,
  hugetlb: {},
  tracefs: { state: 'mountable', path: '/sys/kernel/tracing', events: {} },
};
const avail = (p: Base) => Object.fromEntries(Object.entries(deriveOracles(p)).map(([k, v]) => [k, v.available]));

describe('probe', () => {
  it('detects the flavour from loaded modules and the arm64 command line', () => {
    expect(detectFlavour((m) => m === 'kvm_pvm', '', 'x86_64')).toBe('kvm_pvm');
    expect(detectFlavour((m) => m === 'kvm_amd', '', 'x86_64')).toBe('kvm_amd');
    expect(detectFlavour(() => false, 'quiet kvm-arm.mode=nvhe', 'arm64')).toBe('arm64-nvhe');
    expect(detectFlavour(() => false, 'kvm-arm.mode=protected', 'arm64')).toBe('arm64-protected');
    expect(detectFlavour(() => false, '', 'arm64')).toBe('arm64-vhe');
    expect(detectFlavour(() => false, '', 'x86_64')).toBe('unknown');
  });

  it('on arm64, believes the kernel log over the command line', () => {
    const log = (mode: string) =>
      `Booting Linux on physical CPU 0x0\nCPU: All CPU(s) started at EL2\nkvm [1]: IPA Size Limit: 48 bits\nkvm [1]: ${mode} mode initialized successfully`;
    expect(detectFlavour(() => false, 'kvm-arm.mode=nvhe', 'arm64', log('Hyp'))).toBe('arm64-nvhe');
    expect(detectFlavour(() => false, 'kvm-arm.mode=protected', 'arm64', log('Protected nVHE'))).toBe(
      'arm64-protected',
    );
    expect(detectFlavour(() => false, '', 'arm64', log('VHE'))).toBe('arm64-vhe');
    // Asked for nVHE, initialised in VHE (the log wins); asked for nothing, initialised in nVHE.
    expect(detectFlavour(() => false, 'kvm-arm.mode=nvhe', 'arm64', log('VHE'))).toBe('arm64-vhe');
    expect(detectFlavour(() => false, '', 'arm64', log('Hyp'))).toBe('arm64-nvhe');
    // The log no longer holds the line: the command line decides.
    expect(detectFlavour(() => false, 'kvm-arm.mode=protected', 'arm64', 'unrelated')).toBe('arm64-protected');
  });

  it('kvm_pvm: software walker and shadow pages, no fault stats, no TDP events', () => {
    expect(avail(base)).toEqual({
      exits: true,
      exception_log: true,
      ad_bits: true,
      dirty_log: true,
      dirty_ring: true,
      translate: true,
      stats_faults: false,
      walker_tracepoints: true,
      tdp_spte_tracepoints: false,
      legacy_spte_tracepoints: false,
      shadow_page_tracepoints: true,
      stage2_fault_tracepoints: false,
    });
  });

  it('kvm_amd with NPT and the TDP MMU: SPTE events and fault stats, no shadow pages', () => {
    const p: Base = {
      ...base,
      flavour: 'kvm_amd',
      tdp: { enabled: true, kind: 'npt' },
      tdpMmu: true,
      tracefs: {
        state: 'mounted',
        path: '/sys/kernel/tracing',
        events: {
          'kvmmmu/kvm_tdp_mmu_spte_changed': true,
          'kvmmmu/kvm_mmu_pagetable_walk': true,
          'kvmmmu/kvm_mmu_paging_element': true,
          'kvmmmu/kvm_mmu_walker_error': true,
        },
      },
    };
    const o = avail(p);
    expect(o).toMatchObject({
      stats_faults: true,
      tdp_spte_tracepoints: true,
      shadow_page_tracepoints: false,
      walker_tracepoints: true,
    });
    expect(deriveOracles(p).walker_tracepoints.why).toMatch(/only for emulated accesses/);
    expect(avail({ ...p, tdpMmu: false }).tdp_spte_tracepoints).toBe(false);
    // The legacy MMU (tdp_mmu=0) offers its own events, all five of them.
    expect(o.legacy_spte_tracepoints).toBe(false);
    const legacyEvents = Object.fromEntries(
      ['kvm_mmu_set_spte', 'mark_mmio_spte', 'fast_page_fault', 'kvm_mmu_get_page', 'kvm_mmu_prepare_zap_page'].map(
        (e) => [`kvmmmu/${e}`, true],
      ),
    );
    const legacy = { ...p, tdpMmu: false, tracefs: { ...p.tracefs, events: { ...p.tracefs.events, ...legacyEvents } } };
    expect(avail(legacy).legacy_spte_tracepoints).toBe(true);
    const missing = { ...legacy.tracefs.events, 'kvmmmu/fast_page_fault': false };
    expect(avail({ ...legacy, tracefs: { ...legacy.tracefs, events: missing } }).legacy_spte_tracepoints).toBe(false);
  });

  it('no tracefs means no tracepoint oracle of any kind', () => {
    const o = avail({ ...base, tracefs: { state: 'absent', path: '', events: {} } });
    expect(o).toMatchObject({ walker_tracepoints: false, tdp_spte_tracepoints: false, shadow_page_tracepoints: false });
  });

  it('tracefs out of reach: the oracles say why', () => {
    const why =
      'not mounted, and mounting it needs CAP_SYS_ADMIN, which this process lacks, as in a container without it';
    const o = deriveOracles({ ...base, tracefs: { state: 'absent', path: '/sys/kernel/tracing', events: {}, why } });
    expect(o.walker_tracepoints).toEqual({ available: false, why: `tracefs absent: ${why}` });
    expect(o.shadow_page_tracepoints).toEqual({ available: false, why: `tracefs absent: ${why}` });
    const p: HostProfile = {
      ...base,
      tracefs: { state: 'absent', path: '/sys/kernel/tracing', events: {}, why },
      oracles: o,
    };
    expect(formatProfile(p)).toContain(`\ntracefs            absent (${why})\n`);
  });

  it('tracefs is mountable only by root with CAP_SYS_ADMIN in the initial user namespace', () => {
    const files = (over: Record<string, string | undefined> = {}, uid = 0, dirs = ['/sys/kernel/tracing']): HostFs => {
      const f: Record<string, string | undefined> = {
        '/proc/filesystems': 'nodev\tsysfs\nnodev\ttracefs\n',
        '/proc/self/status': 'Name:\tnode\nCapEff:\t000001ffffffffff\n',
        '/proc/self/uid_map': '         0          0 4294967295\n',
        ...over,
      };
      return {
        read: (p: string) => f[p],
        exists: (p: string) => dirs.includes(p),
        uid: () => uid,
      } as unknown as HostFs;
    };
    expect(tracefsReach(files())).toEqual({ state: 'mountable' });
    expect(tracefsReach(files({}, 0, ['/sys/kernel/tracing', '/sys/kernel/tracing/events']))).toEqual({
      state: 'mounted',
    });
    // Unreadable /proc/self files are no obstacle.
    expect(tracefsReach(files({ '/proc/self/status': undefined, '/proc/self/uid_map': undefined }))).toEqual({
      state: 'mountable',
    });
    const absent = (fs: HostFs) => tracefsReach(fs).why;
    expect(absent(files({ '/proc/filesystems': 'nodev\tsysfs\n' }))).toBe('the kernel offers no tracefs');
    expect(absent(files({}, 0, []))).toBe('not mounted, and there is no /sys/kernel/tracing to mount it on');
    expect(absent(files({}, 1000))).toBe('not mounted, and mounting it needs root');
    // CAP_SYS_ADMIN is bit 21: 0x1fffdfffff lacks it.
    expect(absent(files({ '/proc/self/status': 'CapEff:\t0000001fffdfffff\n' }))).toBe(
      'not mounted, and mounting it needs CAP_SYS_ADMIN, which this process lacks, as in a container without it',
    );
    expect(absent(files({ '/proc/self/uid_map': '         0     100000      65536\n' }))).toBe(
      'not mounted, and this process runs in a user namespace, where tracefs cannot be mounted',
    );
  });

  it('a mounted tracefs without the kvmmmu events offers no walker oracle', () => {
    const o = avail({ ...base, tracefs: { state: 'mounted', path: '/sys/kernel/tracing', events: {} } });
    expect(o.walker_tracepoints).toBe(false);
  });
});

describe('the architecture', () => {
  it("maps Node's names once, and the profile prints Node's name, as it always has", () => {
    expect([archOfNode('x64'), archOfNode('arm64'), archOfNode('ia32')]).toEqual(['x86_64', 'arm64', undefined]);
    const p: HostProfile = { ...base, oracles: deriveOracles(base) };
    expect(formatProfile(p).split('\n')[0]).toBe(`${'arch'.padEnd(18)} x64`);
    expect(Object.keys(JSON.parse(profileJson(p)))).toEqual(Object.keys(p));
    expect(JSON.parse(profileJson(p)).arch).toBe('x64');
    expect(JSON.parse(profileJson({ ...p, arch: 'arm64' })).arch).toBe('arm64');
  });
});
