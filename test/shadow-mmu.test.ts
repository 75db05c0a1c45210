// The shadow MMU observer (tracepoint text) and the live check against the
// shadow MMU model, with the right model and with deliberately wrong ones.
import { describe, expect, it, test } from 'vitest';
import { shadowMmuModel } from '../src/checks/shadow-mmu.js';
import type { Kvm } from '../src/kvm/kvm.js';
import { parseShadowEvent, ShadowPicture } from '../src/observe/shadow-mmu.js';
import type { TraceEvent } from '../src/observe/tracefs.js';
import type { HostProfile } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import { describeKvm, failures, withHost } from './support/kvm.js';

const event = (id: string, text: string): TraceEvent => ({
  id: `kvmmmu/${id}`,
  pid: 1,
  cpu: 0,
  ts: 0,
  fields: {},
  text,
});

describe('shadow-page events', () => {
  test('parses the four events as this host prints them', () => {
    expect(
      parseShadowEvent(event('kvm_mmu_get_page', 'sp gen 0 gfn 10 l4 8-byte q0 wux nxe ad root 0 sync new')),
    ).toEqual({
      kind: 'get',
      gfn: 0x10n,
      level: 4,
      direct: false,
      access: 7,
      invalid: false,
      rootCount: 0,
      unsync: false,
      created: true,
    });
    expect(
      parseShadowEvent(
        event('kvm_mmu_prepare_zap_page', 'sp gen 0 gfn 10 l4 8-byte q0 wux invalid nxe ad root 0 sync'),
      ),
    ).toMatchObject({ kind: 'zap', invalid: true, rootCount: 0 });
    expect(
      parseShadowEvent(event('kvm_mmu_sync_page', 'sp gen 1 gfn 1a3 l1 8-byte q0 -u- !nxe !ad root 0 unsync')),
    ).toMatchObject({ kind: 'sync', gfn: 0x1a3n, level: 1, access: 4, unsync: true });
    expect(
      parseShadowEvent(
        event('kvm_mmu_get_page', 'sp gen 0 gfn 200 l1 8-byte q0 direct w-x nxe ad root 0 sync existing'),
      ),
    ).toMatchObject({ direct: true, access: 3, created: false });
    expect(parseShadowEvent(event('kvm_mmu_pagetable_walk', 'addr 1000 pferr 0 '))).toBeUndefined();
  });

  test('parses the access with a read bit, as Linux 7.2 prints it', () => {
    // Lines as the lab's 7.2 kernel printed them (shadow profile).
    expect(
      parseShadowEvent(event('kvm_mmu_get_page', 'sp gen 0 gfn 16 l1 8-byte q0 rwux nxe ad root 0 sync new')),
    ).toEqual({
      kind: 'get',
      gfn: 0x16n,
      level: 1,
      direct: false,
      access: 7,
      invalid: false,
      rootCount: 0,
      unsync: false,
      created: true,
    });
    expect(
      parseShadowEvent(event('kvm_mmu_unsync_page', 'sp gen 0 gfn 16 l1 8-byte q0 r-u- nxe ad root 0 sync')),
    ).toMatchObject({ kind: 'unsync', access: 4, unsync: false });
    expect(
      parseShadowEvent(event('kvm_mmu_sync_page', 'sp gen 0 gfn 16 l1 8-byte q0 ---- nxe ad root 2 unsync')),
    ).toMatchObject({ kind: 'sync', access: 0, rootCount: 2, unsync: true });
  });

  test('the picture follows get, unsync, sync and zap', () => {
    const p = new ShadowPicture();
    const e = (id: string, text: string) => p.add(parseShadowEvent(event(id, text))!);
    e('kvm_mmu_get_page', 'sp gen 0 gfn 10 l4 8-byte q0 wux nxe ad root 0 sync new');
    e('kvm_mmu_get_page', 'sp gen 0 gfn 13 l1 8-byte q0 wux nxe ad root 0 sync new');
    e('kvm_mmu_unsync_page', 'sp gen 0 gfn 13 l1 8-byte q0 wux nxe ad root 0 sync');
    expect(p.list()).toEqual(['10@4', '13@1 unsync']);
    e('kvm_mmu_sync_page', 'sp gen 0 gfn 13 l1 8-byte q0 wux nxe ad root 0 unsync');
    e('kvm_mmu_prepare_zap_page', 'sp gen 0 gfn 10 l4 8-byte q0 wux nxe ad root 1 sync');
    expect(p.list()).toEqual(['13@1']);
  });
});

describeKvm('shadow_mmu_follows_model on this host', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  it('passes with the right model, or is not applicable with a reason', async () => {
    const r = await runCheck(shadowMmuModel(), kvm, profile);
    if (r.outcome === 'not_applicable') return expect(r.reason).toMatch(/\S/);
    expect(r.outcome, failures(r)).toBe('pass');
  });

  // On a host that emulates every instruction only the roots exist, so of the
  // wrong models only one that never floods makes a different prediction here.
  it('fails with a model that never floods', async () => {
    const r = await runCheck(shadowMmuModel({ wrong: { shadow: 'no-flooding' } }), kvm, profile);
    if (r.outcome === 'not_applicable') return;
    expect(r.outcome).toBe('fail');
    expect(
      r.comparisons
        .filter((c) => !c.ok)
        .map((c) => c.what)
        .join('\n'),
    ).toMatch(/write flooding/);
  });
});
