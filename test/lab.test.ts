// The lab's boot machinery: profiles, the initramfs, kernel checks, and one
// live boot under QEMU/TCG (KVMHARNESS_LAB=1: it downloads Debian's kernel once
// and boots for a few seconds).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  constants,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { labFetch, resolveKernel, type LabKernel } from '../src/lab/fetch/index.js';
import { buildInitramfs, initScript, modulePlan } from '../src/lab/initramfs.js';
import { LabError, PROFILES, parseModparams, profile, withModparams } from '../src/lab/profiles.js';
import { bootLab, kernelCmdline, qemuArgs } from '../src/lab/qemu.js';

const work = mkdtempSync(join(tmpdir(), 'kvmharness-labtest-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** The LabError a call throws (fails the test when it throws something else or nothing). */
async function labError(f: () => unknown): Promise<LabError> {
  try {
    await f();
  } catch (e) {
    if (e instanceof LabError) return e;
    throw e;
  }
  throw new Error('expected a LabError');
}

/** A fake module: ELF-ish bytes with a .modinfo naming its dependencies and vermagic. */
function fakeKo(depends: string, vermagic = '6.1.0-test'): Buffer {
  return Buffer.from(`\x7fELF fake\0license=GPL\0depends=${depends}\0vermagic=${vermagic} SMP mod_unload \0`, 'latin1');
}

/** lib/modules/<v>/kernel/... with irqbypass, kvm, ccp, kvm-amd (kvm.ko xz-compressed), no modules.dep. */
function fakeModules(root: string, v = '6.1.0-test', vermagic = v): string {
  const dir = join(root, 'lib', 'modules', v);
  const put = (rel: string, data: Buffer): void => {
    mkdirSync(join(dir, rel, '..'), { recursive: true });
    writeFileSync(join(dir, rel), data);
  };
  put('kernel/virt/lib/irqbypass.ko', fakeKo('', vermagic));
  put('kernel/drivers/crypto/ccp/ccp.ko', fakeKo('', vermagic));
  put('kernel/arch/x86/kvm/kvm-amd.ko', fakeKo('kvm,ccp', vermagic));
  put('kernel/arch/x86/kvm/kvm.ko.xz', execFileSync('xz', ['-c'], { input: fakeKo('irqbypass', vermagic) }));
  put('kernel/drivers/virtio/virtio.ko', fakeKo('', vermagic));
  put('kernel/drivers/virtio/virtio_ring.ko', fakeKo('virtio', vermagic));
  put('kernel/drivers/virtio/virtio_pci.ko', fakeKo('virtio_ring,virtio', vermagic));
  put('kernel/drivers/char/virtio_console.ko', fakeKo('virtio_ring,virtio', vermagic));
  put('modules.builtin', Buffer.from('kernel/fs/ext4/ext4.ko\n'));
  return dir;
}

/** A minimal x86_64 ELF carrying the PVH entry note (or not) and a "Linux version" banner. */
function fakeVmlinux(path: string, opts: { pvh: boolean; release?: string }): string {
  const note = Buffer.alloc(20);
  note.writeUInt32LE(4, 0); // namesz
  note.writeUInt32LE(4, 4); // descsz
  note.writeUInt32LE(opts.pvh ? 18 : 17, 8); // XEN_ELFNOTE_PHYS32_ENTRY
  note.write('Xen\0', 12, 'latin1');
  const ehdr = Buffer.alloc(64);
  ehdr.writeUInt32BE(0x7f454c46, 0);
  ehdr[4] = 2; // ELFCLASS64
  ehdr[5] = 1; // little-endian
  ehdr[6] = 1;
  ehdr.writeUInt16LE(2, 0x10); // ET_EXEC
  ehdr.writeUInt16LE(62, 0x12); // EM_X86_64
  ehdr.writeBigUInt64LE(64n, 0x20); // e_phoff
  ehdr.writeUInt16LE(56, 0x36);
  ehdr.writeUInt16LE(1, 0x38);
  const phdr = Buffer.alloc(56);
  phdr.writeUInt32LE(4, 0); // PT_NOTE
  phdr.writeBigUInt64LE(120n, 8);
  phdr.writeBigUInt64LE(20n, 32);
  writeFileSync(
    path,
    Buffer.concat([
      ehdr,
      phdr,
      note,
      Buffer.from(`\0Linux version ${opts.release ?? '6.1.0-test'} (test@host) #1 SMP\0`),
    ]),
  );
  return path;
}

const CONFIG = [
  'CONFIG_KVM=m',
  'CONFIG_KVM_AMD=m',
  'CONFIG_TRACING=y',
  'CONFIG_SERIAL_8250=y',
  'CONFIG_SERIAL_8250_CONSOLE=y',
  'CONFIG_PCI=y',
  'CONFIG_VIRTIO_PCI=m',
  'CONFIG_VIRTIO_CONSOLE=m',
  'CONFIG_BLK_DEV_INITRD=y',
  'CONFIG_RD_GZIP=y',
  'CONFIG_DEVTMPFS=y',
  'CONFIG_PVH=y',
];

/** A fake busybox: a script that lists applets like `busybox --list-full`. */
function fakeBusybox(dir: string): string {
  const p = join(dir, 'busybox');
  writeFileSync(p, '#!/bin/sh\nprintf "bin/sh\\nbin/mount\\nsbin/insmod\\nsbin/poweroff\\nusr/bin/[\\n"\n');
  chmodSync(p, 0o755);
  return p;
}

function fakeKernel(name: string, opts: { config?: string[] } = {}): { dir: string; vmlinux: string; modules: string } {
  const dir = join(work, name);
  mkdirSync(dir, { recursive: true });
  const modules = fakeModules(dir);
  const vmlinux = fakeVmlinux(join(dir, 'vmlinux'), { pvh: true });
  writeFileSync(join(dir, 'config-6.1.0-test'), (opts.config ?? CONFIG).join('\n') + '\n');
  return { dir, vmlinux, modules };
}

describe('lab profiles', () => {
  it('gives each x86 profile its KVM module parameters', () => {
    expect(profile('npt-tdp').modparams).toEqual({ kvm: { tdp_mmu: '1' }, kvm_amd: { npt: '1', nested: '0' } });
    expect(profile('npt-legacy').modparams).toEqual({ kvm: { tdp_mmu: '0' }, kvm_amd: { npt: '1', nested: '0' } });
    expect(profile('shadow').modparams.kvm_amd?.npt).toBe('0');
    for (const p of PROFILES.filter((q) => q.arch === 'x86_64')) {
      expect(p.machine.join(' ')).toContain('-cpu max,-la57');
      expect(p.agentTty).toBe('/dev/vport0p1');
      expect(p.agentPort).toBe('kvmharness.agent');
    }
  });

  it('merges --modparams over the profile and rejects malformed words', async () => {
    const p = profile('npt-tdp', 'kvm.tdp_mmu=0 kvm-amd.avic=1 kvm.eager_page_split=N');
    expect(p.modparams).toEqual({
      kvm: { tdp_mmu: '0', eager_page_split: 'N' },
      kvm_amd: { npt: '1', nested: '0', avic: '1' },
    });
    expect(profile('npt-tdp').modparams.kvm?.tdp_mmu).toBe('1'); // the built-in profile is unchanged
    expect(withModparams(profile('shadow'), { kvm: { halt_poll_ns: '0' } }).modparams.kvm).toEqual({
      halt_poll_ns: '0',
    });
    expect((await labError(() => parseModparams('tdp_mmu=1'))).message).toMatch(/bad module parameter 'tdp_mmu=1'/);
    expect((await labError(() => parseModparams('kvm.x=$(reboot)'))).message).toMatch(/bad module parameter/);
    expect((await labError(() => profile('ept'))).message).toMatch(
      /unknown lab profile 'ept' \(known: npt-tdp, npt-legacy, shadow, vhe, nvhe, protected\)/,
    );
  });

  it('records the arm64 profiles as data', () => {
    expect(profile('nvhe').append).toEqual(['kvm-arm.mode=nvhe']);
    expect(profile('protected').append).toEqual(['kvm-arm.mode=protected']);
    expect(profile('vhe').append).toEqual([]);
    for (const n of ['vhe', 'nvhe', 'protected']) {
      const p = profile(n);
      expect(p.qemu).toBe('qemu-system-aarch64');
      expect(p.machine.join(' ')).toContain('virt,virtualization=on,gic-version=3');
      expect(p.machine.join(' ')).toContain('max,pauth-impdef=on');
      expect(p.console).toBe('ttyAMA0');
    }
  });

  it('builds QEMU arguments: ttyS0 the console on stdio, the agent on a virtio-serial port on PCI, PVH through qboot', async () => {
    const k: LabKernel = {
      arch: 'x86_64',
      version: '6.1.0-test',
      vmlinux: '/k/vmlinux',
      bzImage: '/k/bzImage',
      modulesDir: undefined,
      busybox: '/bb',
      builtin: ['kvm', 'kvm_amd', 'virtio_pci', 'virtio_console'],
    };
    const args = qemuArgs({ kernel: k, initramfs: '/i.gz', profile: profile('npt-tdp'), agentPath: '/t/agent' });
    const s = args.join(' ');
    // Two CPUs (the race scenarios' vCPU threads), emulated in turns by one host thread.
    expect(s).toContain('-accel tcg,thread=single -cpu max,-la57 -m 1G -smp 2 -bios /usr/share/qemu/qboot.rom');
    expect(s).toContain('-kernel /k/vmlinux -initrd /i.gz');
    expect(s).toContain('-no-reboot');
    // One serial port, the console; the agent's pipe backs a named virtio-serial port.
    const serials = args.flatMap((a, i) => (a === '-serial' ? [args[i + 1]] : []));
    expect(serials).toEqual(['chardev:console']);
    expect(args).toContain('stdio,id=console,signal=off');
    expect(args).toContain('pipe,id=agent,path=/t/agent');
    expect(s).toContain(
      '-device virtio-serial-pci -chardev pipe,id=agent,path=/t/agent -device virtserialport,chardev=agent,name=kvmharness.agent,nr=1',
    );
    // Built-in KVM takes its parameters on the command line.
    expect(args[args.indexOf('-append') + 1]).toBe(
      'console=ttyS0 panic=-1 quiet hugepages=8 cryptomgr.notests=1 initcall_blacklist=crypto_kdf108_init pci=noacpi kvm.tdp_mmu=1 kvm_amd.npt=1 kvm_amd.nested=0',
    );
    // Without a PVH vmlinux: the bzImage through SeaBIOS.
    const bz = qemuArgs({
      kernel: { ...k, vmlinux: undefined },
      initramfs: '/i.gz',
      profile: profile('npt-tdp'),
      agentPath: '/t/agent',
    });
    expect(bz).not.toContain('-bios');
    expect(bz.join(' ')).toContain('-kernel /k/bzImage');
    expect(
      (await labError(() => qemuArgs({ kernel: k, initramfs: '/i.gz', profile: profile('nvhe'), agentPath: '/t/a' })))
        .message,
    ).toMatch(/profile nvhe is for arm64, the kernel 6\.1\.0-test is x86_64/);
  });

  it('builds arm64 QEMU arguments: the Image on virt with EL2, the console on the PL011, the agent on a named virtio-serial port', () => {
    const k: LabKernel = {
      arch: 'arm64',
      version: '6.1.0-test-arm64',
      image: '/k/Image',
      modulesDir: undefined,
      busybox: '/bb',
      builtin: ['kvm', 'virtio_mmio', 'virtio_console'],
    };
    for (const name of ['vhe', 'nvhe', 'protected']) {
      const args = qemuArgs({ kernel: k, initramfs: '/i.gz', profile: profile(name), agentPath: '/t/agent' });
      const s = args.join(' ');
      expect(s).toContain('-M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on -accel tcg');
      expect(s).toContain('-kernel /k/Image -initrd /i.gz');
      expect(s).toContain('-no-reboot');
      expect(args.flatMap((a, i) => (a === '-serial' ? [args[i + 1]] : []))).toEqual(['chardev:console']);
      expect(args).toContain('pipe,id=agent,path=/t/agent');
      expect(s).toContain('-device virtio-serial-device');
      expect(s).toContain('-device virtserialport,chardev=agent,name=kvmharness.agent,nr=1');
      const mode = { vhe: '', nvhe: ' kvm-arm.mode=nvhe', protected: ' kvm-arm.mode=protected' }[name];
      expect(args[args.indexOf('-append') + 1]).toBe(
        `console=ttyAMA0 panic=-1 quiet hugepages=8 cryptomgr.notests=1 initcall_blacklist=crypto_kdf108_init${mode}`,
      );
    }
  });
});

describe('lab initramfs', () => {
  const k = fakeKernel('initramfs');
  const kernel: LabKernel = {
    arch: 'x86_64',
    version: '6.1.0-test',
    vmlinux: k.vmlinux,
    modulesDir: k.modules,
    busybox: fakeBusybox(k.dir),
    builtin: [],
  };
  const agent = join(k.dir, 'agent-bin');
  writeFileSync(agent, 'AGENT BINARY');

  /** `cpio -t -v` of the gzip'd archive, and one member's contents. */
  const list = (gz: Buffer): string =>
    execFileSync('cpio', ['-t', '-v', '--quiet'], { input: gunzipSync(gz), encoding: 'utf8' });
  const member = (gz: Buffer, name: string): Buffer =>
    execFileSync('cpio', ['-i', '--to-stdout', '--quiet', name], { input: gunzipSync(gz) });

  it('holds busybox and its links, the KVM modules with dependencies, the agent and /init', () => {
    const out = buildInitramfs({
      kernel,
      agentBinary: agent,
      profile: profile('npt-tdp'),
      out: join(k.dir, 'initrd.gz'),
    });
    const gz = readFileSync(out);
    const t = list(gz);
    const names = execFileSync('cpio', ['-t', '--quiet'], { input: gunzipSync(gz), encoding: 'utf8' }).split('\n');
    for (const n of [
      'init',
      'agent',
      'bin/busybox',
      'dev/console',
      'lib/modules/irqbypass.ko',
      'lib/modules/kvm.ko',
      'lib/modules/ccp.ko',
      'lib/modules/kvm-amd.ko',
      'lib/modules/virtio_pci.ko',
      'lib/modules/virtio_console.ko',
    ]) {
      expect(names).toContain(n);
    }
    expect(t).toMatch(/^l.* bin\/sh -> \/bin\/busybox$/m);
    expect(t).toMatch(/^l.* usr\/bin\/\[ -> \/bin\/busybox$/m);
    expect(t).toMatch(/^crw------- .* dev\/console$/m);
    expect(t).toMatch(/^-rwxr-xr-x .* init$/m);
    // kvm.ko.xz went in decompressed.
    expect(member(gz, 'lib/modules/kvm.ko').toString('latin1')).toContain('depends=irqbypass');
    expect(member(gz, 'agent').toString()).toBe('AGENT BINARY');

    const init = member(gz, 'init').toString();
    expect(init.startsWith('#!/bin/sh\n')).toBe(true);
    for (const s of [
      'mount -t proc proc /proc',
      'mount -t sysfs sysfs /sys',
      'mount -t devtmpfs devtmpfs /dev',
      'mount -t tracefs nodev /sys/kernel/tracing',
    ])
      expect(init).toContain(s);
    const insmods = init.split('\n').filter((l) => l.includes(' insmod /lib/modules/'));
    expect(insmods.map((l) => l.slice(l.indexOf(' insmod ') + 1))).toEqual([
      'insmod /lib/modules/irqbypass.ko',
      'insmod /lib/modules/kvm.ko tdp_mmu=1',
      'insmod /lib/modules/ccp.ko',
      'insmod /lib/modules/kvm-amd.ko npt=1 nested=0',
      'insmod /lib/modules/virtio.ko',
      'insmod /lib/modules/virtio_ring.ko',
      'insmod /lib/modules/virtio_pci.ko',
      'insmod /lib/modules/virtio_console.ko',
    ]);
    expect(init).toContain("step 'insmod kvm-amd.ko' insmod");
    expect(init).toContain('echo "KVMHARNESS-LAB-FAIL $*"');
    expect(init).toContain('echo "KVMHARNESS-LAB-READY $(uname -r)"');
    expect(init).toMatch(/READY[^\n]*\n\/agent --virtio-port kvmharness\.agent\n/);
    expect(init).toMatch(/\/agent --virtio-port kvmharness\.agent\n.*\npoweroff -f\n/);
    expect(init).toContain('/sys/class/virtio-ports');
    expect(init).not.toContain('stty');
    // The /init parses with the host's sh.
    expect(spawnSync('sh', ['-n'], { input: init }).status).toBe(0);
  });

  it('names the file by its content in a cache directory: the same content is reused, other modules get another file', () => {
    const dir = join(k.dir, 'initramfs-cache');
    const a = buildInitramfs({ kernel, agentBinary: agent, profile: profile('npt-tdp'), dir });
    const size = readFileSync(a).length;
    expect(a).toMatch(/initramfs-npt-tdp-[0-9a-f]{20}\.cpio\.gz$/);
    expect(buildInitramfs({ kernel, agentBinary: agent, profile: profile('npt-tdp'), dir })).toBe(a);
    expect(readFileSync(a).length).toBe(size);
    const b = buildInitramfs({
      kernel,
      agentBinary: agent,
      profile: profile('npt-tdp', 'kvm.eager_page_split=0'),
      dir,
    });
    expect(b).not.toBe(a);
    expect(existsSync(a) && existsSync(b)).toBe(true);
    // Nothing half-written is left behind.
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  it('puts parameters of modules the lab does not load in an error, and built-in ones on the command line', async () => {
    const p = profile('npt-tdp', 'kvm_intel.ept=0');
    expect((await labError(() => modulePlan(kernel, p))).message).toMatch(
      /module parameters for kvm_intel, which the lab does not load/,
    );
    const builtin: LabKernel = {
      ...kernel,
      modulesDir: undefined,
      builtin: ['kvm', 'kvm_amd', 'virtio_pci', 'virtio_console'],
    };
    expect(modulePlan(builtin, profile('shadow'))).toEqual({
      loads: [],
      cmdline: ['kvm_amd.npt=0', 'kvm_amd.nested=0'],
    });
    expect(kernelCmdline(builtin, profile('shadow'))).toBe(
      'console=ttyS0 panic=-1 quiet hugepages=8 cryptomgr.notests=1 initcall_blacklist=crypto_kdf108_init pci=noacpi kvm_amd.npt=0 kvm_amd.nested=0',
    );
  });

  it('arm64: loads the virtio channel modules, waits for the named port and runs the agent on it', () => {
    const init = initScript(
      profile('nvhe'),
      [
        { name: 'virtio_mmio', file: 'virtio_mmio.ko', source: '/m/virtio_mmio.ko', params: [] },
        { name: 'virtio_console', file: 'virtio_console.ko', source: '/m/virtio_console.ko', params: [] },
      ],
      { installApplets: true },
    );
    const insmods = init
      .split('\n')
      .filter((l) => l.includes(' insmod /lib/modules/'))
      .map((l) => l.slice(l.indexOf(' insmod ') + 1));
    expect(insmods).toEqual(['insmod /lib/modules/virtio_mmio.ko', 'insmod /lib/modules/virtio_console.ko']);
    expect(init).toContain('cat /sys/class/virtio-ports/$p/name');
    expect(init).toContain('fail "no virtio port kvmharness.agent for the agent"');
    expect(init).not.toContain('stty');
    expect(init).not.toMatch(/\/\*/); // /init runs with set -f: no globs
    expect(init).toMatch(/READY[^\n]*\n\/agent --virtio-port kvmharness\.agent\n/);
    expect(spawnSync('sh', ['-n'], { input: init }).status).toBe(0);
  });

  it('installs busybox links at boot when the busybox cannot run here', () => {
    const init = initScript(profile('shadow'), [], { installApplets: true });
    expect(init.split('\n')[3]).toBe('/bin/busybox --install -s');
  });
});

describe('lab kernel paths', () => {
  const bb = fakeBusybox(work);

  it('names a missing kernel or modules path', async () => {
    expect((await labError(() => resolveKernel({ kernel: '/no/such/bzImage', busybox: bb }))).message).toBe(
      'kernel image not found: /no/such/bzImage',
    );
    const k = fakeKernel('paths');
    expect(
      (await labError(() => resolveKernel({ kernel: k.vmlinux, modules: '/no/such/modules', busybox: bb }))).message,
    ).toBe('modules directory not found: /no/such/modules');
    expect((await labError(() => resolveKernel({ kernel: k.dir, busybox: bb }))).message).toMatch(
      /kernel image is not a file/,
    );
    const junk = join(work, 'junk');
    writeFileSync(junk, 'not a kernel');
    expect((await labError(() => resolveKernel({ kernel: junk, busybox: bb }))).message).toMatch(
      /neither a bzImage nor an ELF vmlinux/,
    );
  });

  it('accepts a vmlinux with its modules and config', async () => {
    const k = fakeKernel('good');
    const kernel = await resolveKernel({ kernel: k.vmlinux, modules: k.modules, busybox: bb });
    expect(kernel).toMatchObject({
      arch: 'x86_64',
      version: '6.1.0-test',
      vmlinux: k.vmlinux,
      modulesDir: k.modules,
      config: join(k.dir, 'config-6.1.0-test'),
      builtin: [],
    });
    // lib/modules or the tree root are accepted for lib/modules/<version>.
    expect((await resolveKernel({ kernel: k.vmlinux, modules: k.dir, busybox: bb })).modulesDir).toBe(k.modules);
  });

  it('names the missing KVM module or config option', async () => {
    const k = fakeKernel('nokvm');
    const empty = join(k.dir, 'lib', 'modules', 'empty');
    mkdirSync(empty);
    rmSync(join(k.dir, 'config-6.1.0-test'));
    const e1 = await labError(() => resolveKernel({ kernel: k.vmlinux, modules: empty, busybox: bb }));
    expect(e1.message).toMatch(/no kvm\.ko in .*empty \(the lab needs a kernel built with CONFIG_KVM\)/);
    expect(e1.message).toMatch(/no kvm-amd\.ko .*CONFIG_KVM_AMD/);
    expect(e1.message.includes('\n')).toBe(false);

    const c = fakeKernel('noamd', {
      config: CONFIG.filter((l) => !l.startsWith('CONFIG_KVM_AMD')).concat(
        '# CONFIG_KVM_AMD is not set',
        '# CONFIG_TRACING is not set',
      ),
    });
    const e2 = await labError(() => resolveKernel({ kernel: c.vmlinux, modules: c.modules, busybox: bb }));
    expect(e2.message).toMatch(/CONFIG_KVM_AMD is not set/);
    expect(e2.message).toMatch(/CONFIG_TRACING is not set/);

    const bare = join(work, 'bare-vmlinux');
    fakeVmlinux(bare, { pvh: true });
    expect((await labError(() => resolveKernel({ kernel: bare, busybox: bb }))).message).toMatch(
      /the lab needs kvm\.ko \(unless CONFIG_KVM=y\) and kvm-amd\.ko \(unless CONFIG_KVM_AMD=y\) and virtio-pci\.ko \(unless CONFIG_VIRTIO_PCI=y\) and virtio-console\.ko \(unless CONFIG_VIRTIO_CONSOLE=y\): give the modules directory/,
    );

    rmSync(join(k.modules, 'kernel', 'drivers', 'crypto', 'ccp', 'ccp.ko'));
    writeFileSync(join(k.dir, 'config-6.1.0-test'), CONFIG.join('\n'));
    expect(
      (await labError(() => resolveKernel({ kernel: k.vmlinux, modules: k.modules, busybox: bb }))).message,
    ).toMatch(/kvm-amd\.ko needs ccp\.ko, which is not in/);
  });

  it('arm64: accepts an Image with its virtio modules, names what is missing, and refuses an Image for x86', async () => {
    const dir = join(work, 'arm64');
    const v = '6.1.0-test-arm64';
    const modules = join(dir, 'lib', 'modules', v);
    mkdirSync(join(modules, 'kernel', 'drivers', 'virtio'), { recursive: true });
    mkdirSync(join(modules, 'kernel', 'drivers', 'char'), { recursive: true });
    writeFileSync(join(modules, 'kernel', 'drivers', 'virtio', 'virtio_mmio.ko'), fakeKo('', v));
    writeFileSync(join(modules, 'kernel', 'drivers', 'char', 'virtio_console.ko'), fakeKo('', v));
    // An arm64 Image: the boot header's magic "ARM\x64" at 0x38, then the banner.
    const header = Buffer.alloc(64);
    header.writeUInt32LE(0x644d5241, 0x38);
    const image = join(dir, 'Image');
    writeFileSync(image, Buffer.concat([header, Buffer.from(`\0Linux version ${v} (test@host) #1 SMP\0`)]));
    const config = [
      'CONFIG_KVM=y',
      'CONFIG_TRACING=y',
      'CONFIG_SERIAL_AMBA_PL011=y',
      'CONFIG_SERIAL_AMBA_PL011_CONSOLE=y',
      'CONFIG_VIRTIO_MMIO=m',
      'CONFIG_VIRTIO_CONSOLE=m',
      'CONFIG_BLK_DEV_INITRD=y',
      'CONFIG_RD_GZIP=y',
      'CONFIG_DEVTMPFS=y',
    ];
    writeFileSync(join(dir, `config-${v}`), config.join('\n') + '\n');
    const k = await resolveKernel({ arch: 'arm64', kernel: image, modules, busybox: bb });
    expect(k).toMatchObject({ arch: 'arm64', version: v, image, modulesDir: modules, builtin: ['kvm'] });
    expect(modulePlan(k, profile('nvhe')).loads.map((l) => l.name)).toEqual(['virtio_mmio', 'virtio_console']);

    expect((await labError(() => resolveKernel({ kernel: image, modules, busybox: bb }))).message).toMatch(
      /is an arm64 Image: use --arch arm64/,
    );
    const k86 = fakeKernel('not-arm64');
    expect((await labError(() => resolveKernel({ arch: 'arm64', kernel: k86.vmlinux, busybox: bb }))).message).toMatch(
      /is not an arm64 Image/,
    );

    writeFileSync(
      join(dir, `config-${v}`),
      config.map((l) => (l === 'CONFIG_KVM=y' ? 'CONFIG_KVM=m' : l)).join('\n') + '\n',
    );
    rmSync(join(modules, 'kernel', 'drivers', 'char', 'virtio_console.ko'));
    const e = await labError(() => resolveKernel({ arch: 'arm64', kernel: image, modules, busybox: bb }));
    expect(e.message).toMatch(/CONFIG_KVM is =m \(needed for KVM \(built in on arm64\)\)/);
    expect(e.message).toMatch(
      /no virtio_console\.ko in .* \(the lab needs a kernel built with CONFIG_VIRTIO_CONSOLE\)/,
    );
  });

  it('names CONFIG_PVH for a vmlinux without a PVH entry, and mismatched modules', async () => {
    const k = fakeKernel('nopvh');
    fakeVmlinux(k.vmlinux, { pvh: false });
    expect(
      (await labError(() => resolveKernel({ kernel: k.vmlinux, modules: k.modules, busybox: bb }))).message,
    ).toMatch(/has no PVH entry \(CONFIG_PVH is not set\)/);
    fakeVmlinux(k.vmlinux, { pvh: true, release: '6.1.0-other' });
    expect(
      (await labError(() => resolveKernel({ kernel: k.vmlinux, modules: k.modules, busybox: bb }))).message,
    ).toMatch(/the modules are built for 6\.1\.0-test but the kernel is 6\.1\.0-other/);
  });
});

// ---------------------------------------------------------------------------
// One live boot: the default kernel, a stand-in agent, bytes both ways.

const live = process.env.KVMHARNESS_LAB === '1';
const gcc = spawnSync('gcc', ['--version']).status === 0;
const skipLive = !live
  ? 'set KVMHARNESS_LAB=1 to download the lab kernel and boot it (~10 s)'
  : !gcc
    ? 'no gcc for the stand-in agent'
    : undefined;

const STAND_IN_AGENT = String.raw`
#include <fcntl.h>
#include <termios.h>
#include <unistd.h>
/* Opens the agent line (/init runs "/agent --dev PATH" or "/agent --virtio-port NAME", whose port is
   /dev/vport0p1, the only one), says AGENT-HELLO, echoes every line back. */
int main(int argc, char **argv) {
  const char *dev = argc > 1 && argv[argc - 1][0] == '/' ? argv[argc - 1] : "/dev/vport0p1";
  int fd = open(dev, O_RDWR | O_NOCTTY);
  if (fd < 0) return 1;
  struct termios t;
  if (tcgetattr(fd, &t) == 0) { cfmakeraw(&t); tcsetattr(fd, TCSANOW, &t); }
  if (write(fd, "AGENT-HELLO\n", 12) != 12) return 1;
  char line[4096];
  size_t n = 0;
  char c;
  while (read(fd, &c, 1) == 1) {
    line[n++] = c;
    if (c == '\n' || n == sizeof line) {
      if (write(fd, line, n) != (ssize_t)n) return 1;
      n = 0;
    }
  }
  return 0;
}
`;

describe.skipIf(skipLive !== undefined)(`lab live boot${skipLive ? ` [skipped: ${skipLive}]` : ''}`, () => {
  it('boots npt-tdp, talks to the agent over its virtio-serial port both ways, and leaves no QEMU behind', async () => {
    const logs: string[] = [];
    const log = (s: string): void => {
      logs.push(s);
    };
    const kernel = await labFetch({ log });
    expect(kernel.version).toMatch(/-amd64$/);
    const dir = join(work, 'live');
    mkdirSync(dir);
    writeFileSync(join(dir, 'agent.c'), STAND_IN_AGENT);
    execFileSync('gcc', ['-static', '-O2', '-o', join(dir, 'agent'), join(dir, 'agent.c')]);
    const p = profile('npt-tdp');
    const initramfs = buildInitramfs({
      kernel,
      agentBinary: join(dir, 'agent'),
      profile: p,
      out: join(dir, 'initrd.gz'),
    });
    const lab = await bootLab({ kernel, initramfs, profile: p, log });
    let rs: net.Socket | undefined;
    let wfd: number | undefined;
    try {
      expect(lab.kernelRelease).toBe(kernel.version);
      expect(lab.params).toEqual({ 'kvm.tdp_mmu': 'Y', 'kvm_amd.npt': 'Y', 'kvm_amd.nested': '0' });
      expect(logs.some((l) => /ready in \d+\.\d s/.test(l))).toBe(true);
      process.stderr.write(`lab boot: ${(lab.bootMs / 1000).toFixed(2)} s to READY\n`);

      let got = Buffer.alloc(0);
      rs = new net.Socket({
        fd: openSync(lab.agentOut, constants.O_RDONLY | constants.O_NONBLOCK),
        readable: true,
        writable: false,
      });
      rs.on('data', (d: Buffer) => (got = Buffer.concat([got, d])));
      const until = async (want: Buffer): Promise<void> => {
        for (const t0 = Date.now(); !got.includes(want); await new Promise((r) => setTimeout(r, 10))) {
          if (Date.now() - t0 > 15_000)
            throw new Error(
              `waited for ${JSON.stringify(want.toString('latin1'))}, got ${JSON.stringify(got.toString('latin1'))}\n${lab.consoleTail()}`,
            );
        }
      };
      await until(Buffer.from('AGENT-HELLO\n'));
      wfd = openSync(lab.agentIn, 'w');
      got = Buffer.alloc(0);
      writeSync(wfd, 'ping from the host\n');
      await until(Buffer.from('ping from the host\n'));
      // 8-bit clean: every byte value but the line end, through the line and back.
      const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i).filter((b) => b !== 0x0a));
      const line = Buffer.concat([bytes, Buffer.from('\n')]);
      got = Buffer.alloc(0);
      writeSync(wfd, line);
      await until(Buffer.from('\n'));
      expect(got.equals(line)).toBe(true);
    } finally {
      rs?.destroy();
      if (wfd !== undefined) closeSync(wfd);
      await lab.close();
    }
    expect(() => process.kill(lab.pid, 0)).toThrow(/ESRCH/);
    expect(spawnSync('pgrep', ['-f', lab.agentIn.replace(/\.in$/, '')]).status).toBe(1);
    expect(existsSync(lab.consoleLog)).toBe(false);
    await lab.close(); // twice is fine
  });
});

describe.skipIf(skipLive !== undefined)(`lab run and Ctrl-C${skipLive ? ` [skipped: ${skipLive}]` : ''}`, () => {
  it('a SIGINT in the middle of the checks ends the run within seconds and leaves no QEMU behind', async () => {
    const bin = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');
    const child = spawn(process.execPath, [bin, 'lab', 'run', '--profile', 'shadow', '--', 'run', 'scenarios'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
    const results = () => (err.match(/^\[\d+\/\d+\] /gm) ?? []).length;
    // Wait until checks are running in the lab (three results), then interrupt.
    for (const t0 = Date.now(); results() < 3; await new Promise((r) => setTimeout(r, 50))) {
      if (Date.now() - t0 > 120_000) throw new Error(`no checks finished in the lab:\n${err}`);
    }
    const qemus = spawnSync('pgrep', ['-P', String(child.pid), 'qemu-system'], { encoding: 'utf8' })
      .stdout.trim()
      .split('\n')
      .filter(Boolean)
      .map(Number);
    expect(qemus.length).toBe(1);
    const before = results();
    const t1 = Date.now();
    child.kill('SIGINT');
    await exited;
    expect(Date.now() - t1).toBeLessThan(10_000);
    expect(child.exitCode === 0).toBe(false);
    // At most the check that was running finishes; the rest never start.
    expect(results() - before).toBeLessThanOrEqual(1);
    // QEMU was sent SIGTERM (SIGKILL after a grace period) before this process died.
    const alive = (pid: number) =>
      spawnSync('ps', ['-o', 'stat=', '-p', String(pid)], { encoding: 'utf8' })
        .stdout.trim()
        .replace(/^Z.*/, '') !== '';
    for (
      const t0 = Date.now();
      qemus.some(alive) && Date.now() - t0 < 5_000;
      await new Promise((r) => setTimeout(r, 100))
    );
    expect(qemus.filter(alive)).toEqual([]);
  }, 180_000);
});

describe.skipIf(skipLive !== undefined)(`two lab runs at once${skipLive ? ` [skipped: ${skipLive}]` : ''}`, () => {
  it('each boots its own initramfs (its own module parameters) and both pass', async () => {
    const bin = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');
    const start = (split: string) => {
      const child = spawn(
        process.execPath,
        [bin, 'lab', 'probe', '--release', '6.1', '--json', '--modparams', `kvm.eager_page_split=${split}`],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let out = '';
      let err = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      return new Promise<{ code: number | null; out: string; err: string }>((resolve) =>
        child.on('exit', (code) => resolve({ code, out, err })),
      );
    };
    const [a, b] = await Promise.all([start('0'), start('1')]);
    expect(a.code, a.err).toBe(0);
    expect(b.code, b.err).toBe(0);
    expect(JSON.parse(a.out).moduleParams['kvm.eager_page_split']).toBe('N');
    expect(JSON.parse(b.out).moduleParams['kvm.eager_page_split']).toBe('Y');
  }, 240_000);
});

describe.skipIf(skipLive !== undefined)(`lab run --kvm-source${skipLive ? ` [skipped: ${skipLive}]` : ''}`, () => {
  it('two runs with different KVM source trees started together each boot their own modules', async () => {
    const { labSource, SOURCE_MARK } = await import('../src/lab/kvm-source.js');
    const { breakZapping } = await import('../bench/kvm-source.js');
    const { labCacheDir } = await import('../src/lab/fetch/index.js');
    // Kept in the cache: later runs build incrementally.
    const root = join(labCacheDir(), 'test-kvm-source');
    const stock = join(root, 'stock');
    const broken = join(root, 'broken');
    for (const dir of [stock, broken]) {
      if (existsSync(join(dir, SOURCE_MARK))) continue;
      rmSync(dir, { recursive: true, force: true });
      await labSource({ release: '6.1', dir, log: () => {} });
    }
    const tdpMmu = join(broken, 'arch', 'x86', 'kvm', 'mmu', 'tdp_mmu.c');
    const text = readFileSync(tdpMmu, 'utf8');
    if (!text.includes('if (iter.level > PG_LEVEL_4K) tdp_mmu_set_spte')) writeFileSync(tdpMmu, breakZapping(text));
    const bin = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');
    const start = (tree: string) => {
      const child = spawn(
        process.execPath,
        [
          bin,
          'lab',
          'run',
          '--release',
          '6.1',
          '--kvm-source',
          tree,
          '--profile',
          'npt-tdp',
          '--',
          'run',
          'tdp_spte_picture',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (out += d.toString()));
      return new Promise<{ code: number | null; out: string }>((resolve) =>
        child.on('exit', (code) => resolve({ code, out })),
      );
    };
    const [a, b] = await Promise.all([start(stock), start(broken)]);
    expect(a.out).toMatch(/^PASS +tdp_spte_picture/m);
    expect(a.code, a.out).toBe(0);
    expect(b.out).toMatch(/^FAIL +tdp_spte_picture/m);
    expect(b.out).toMatch(/after MADV_DONTNEED of 3 pages: gfn 0x[0-9a-f]+: expected "not mapped"/);
    expect(b.code).toBe(1);
  }, 900_000);
});
