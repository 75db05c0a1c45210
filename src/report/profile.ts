// `kvmharness probe`: a host profile as text.
import { nodeArch } from '../arch/arch.js';
import { guestWalkerOf, type HostProfile } from '../probe/probe.js';

/** The profile as `probe --json` prints it: the KVM host's architecture by Node's name, as before it had one. */
export function profileJson(p: HostProfile): string {
  return JSON.stringify({ ...p, arch: nodeArch(p.arch) }, null, 2);
}

export function formatProfile(p: HostProfile): string {
  const lines: string[] = [];
  const kv = (k: string, v: string) => lines.push(`${k.padEnd(18)} ${v}`);
  kv('arch', nodeArch(p.arch));
  kv('device', `${p.device} (API ${p.apiVersion})`);
  kv('flavour', p.flavour);
  kv('tdp', p.tdp.enabled ? `on (${p.tdp.kind})` : 'off (shadow MMU)');
  kv('tdp_mmu', p.tdpMmu === null ? 'n/a' : p.tdpMmu ? 'on' : 'off');
  kv(
    'module params',
    Object.entries(p.moduleParams)
      .map(([k, v]) => `${k}=${v}`)
      .join(' '),
  );
  kv('memslots / vcpus', `${p.maxMemslots} / ${p.maxVcpus}`);
  if (p.cpu) {
    const c = p.cpu;
    const f = (['nx', 'smep', 'smap', 'pku', 'la57', 'pdpe1gb'] as const).map((k) => `${k}=${c[k] ? 1 : 0}`).join(' ');
    kv('guest cpu', `${c.vendor} maxphyaddr=${c.maxPhyAddr} ${f}`);
    kv('guest walks', `${guestWalkerOf(p)} (host cpu: ${c.brand || 'unknown'})`);
  }
  kv('thp', p.thp ? `${p.thp.enabled} (defrag ${p.thp.defrag})` : 'absent');
  kv(
    'hugetlb',
    Object.entries(p.hugetlb)
      .map(([k, v]) => `${k}: ${v.free}/${v.total} free`)
      .join(', ') || 'none',
  );
  kv('tracefs', p.tracefs.why ? `${p.tracefs.state} (${p.tracefs.why})` : p.tracefs.state);
  lines.push('capabilities');
  for (const [k, v] of Object.entries(p.capabilities)) lines.push(`  ${k.replace(/^KVM_CAP_/, '').padEnd(30)} ${v}`);
  lines.push('oracles');
  for (const [k, v] of Object.entries(p.oracles))
    lines.push(`  ${k.padEnd(24)} ${v.available ? 'yes' : 'no '}  ${v.why}`);
  if (p.kernel) {
    lines.push(`kernel ${p.kernel.release ?? '(release unknown)'}: the models assume`);
    for (const [k, v] of Object.entries(p.kernel.behaviours))
      lines.push(`  ${k.padEnd(24)} ${v.on ? 'yes' : 'no '}  ${v.why}`);
  }
  return lines.join('\n');
}
