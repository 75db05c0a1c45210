// One type per file descriptor, as rust-vmm's kvm-ioctls has them: Kvm (the
// device, this file), Vm (vm.ts), Vcpu (vcpu.ts); memslots and their host
// memory in memslot.ts. Every method is a thin, total wrapper: it returns a
// value or throws a KvmError naming the call. Every call goes to the target
// the device was opened on.
import { constants } from 'node:os';
import { check, HostError, KvmError, type Addon } from './sys.js';
import { cpuidBuffer, decodeCpuid, type CpuidEntry } from './cpuid.js';
import { Vm } from './vm.js';
import type { Target } from './target.js';
import { IOCTL, O_RDWR } from '../uapi/uapi.js';

const { E2BIG, EACCES, EINTR, EISDIR, ENOENT, EPERM } = constants.errno;

export function defaultDevice(): string {
  return process.env.KVMHARNESS_DEVICE || '/dev/kvm';
}

/** The group that owns `path` by name, from the target's /etc/group (undefined when either is unknown). */
export function owningGroup(target: Pick<Target, 'fs'>, path: string): string | undefined {
  const gid = target.fs.gidOf?.(path);
  if (gid === undefined) return undefined;
  for (const line of (target.fs.read('/etc/group') ?? '').split('\n')) {
    const [name, , id] = line.split(':');
    if (name && id !== undefined && Number(id) === gid && /^\d+$/.test(id)) return name;
  }
  return undefined;
}

/** What to do about a device the user may not open: join the group that owns it, named when it is known. */
export function permissionHint(target: Pick<Target, 'fs'>, path: string): string {
  const group = owningGroup(target, path);
  if (group === undefined) return `run as root, or add your user to the group that owns ${path}`;
  if (group === 'root') {
    return `${path} is owned by group root: run as root, or give it a group of its own (e.g. kvm) that your user is in`;
  }
  return (
    `run as root, or add your user to group ${group}, which owns ${path}: ` +
    `sudo usermod -aG ${group} $USER, then log in again`
  );
}

export class Kvm {
  /** System calls on the target. */
  private readonly sys: Addon;

  private constructor(
    readonly target: Target,
    readonly fd: number,
    readonly path: string,
  ) {
    this.sys = target.addon;
  }

  /** Opens the KVM device of `target`; a HostError says what is missing and how to fix it. */
  static open(target: Target, path = defaultDevice()): Kvm {
    const r = target.addon.open(path, O_RDWR);
    if (r < 0) {
      const e = -r;
      if (e === ENOENT)
        throw new HostError(
          `${path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or point --device / KVMHARNESS_DEVICE at the device)`,
        );
      if (e === EACCES || e === EPERM)
        throw new HostError(`${path}: permission denied (${permissionHint(target, path)})`);
      if (e === EISDIR) {
        throw new HostError(
          `${path} is a directory, not a KVM device (point --device / KVMHARNESS_DEVICE at the device node, as /dev/kvm)`,
        );
      }
      throw new HostError(`cannot open ${path}: ${new KvmError('open', e).message}`);
    }
    const kvm = new Kvm(target, r, path);
    let version: number;
    try {
      version = kvm.apiVersion();
    } catch (err) {
      kvm.close();
      throw new HostError(`${path} is not a KVM device (${(err as Error).message})`);
    }
    if (version !== 12) {
      kvm.close();
      throw new HostError(`${path}: KVM API version ${version}, expected 12`);
    }
    return kvm;
  }

  apiVersion(): number {
    return check('KVM_GET_API_VERSION', this.sys.ioctl(this.fd, IOCTL.KVM_GET_API_VERSION));
  }
  checkExtension(cap: number): number {
    return check('KVM_CHECK_EXTENSION', this.sys.ioctl(this.fd, IOCTL.KVM_CHECK_EXTENSION, cap));
  }
  private mmapSize = 0;
  /** Size of a vCPU mapping (asked once; it does not change). */
  vcpuMmapSize(): number {
    return (this.mmapSize ||= check('KVM_GET_VCPU_MMAP_SIZE', this.sys.ioctl(this.fd, IOCTL.KVM_GET_VCPU_MMAP_SIZE)));
  }
  supportedCpuid(): CpuidEntry[] {
    for (let cap = 64; ; cap *= 2) {
      const b = cpuidBuffer([], cap);
      const r = this.sys.ioctlBuf(this.fd, IOCTL.KVM_GET_SUPPORTED_CPUID, b);
      if (r === -E2BIG && cap < 4096) continue;
      check('KVM_GET_SUPPORTED_CPUID', r);
      return decodeCpuid(b);
    }
  }
  createVm(type = 0): Vm {
    // KVM_CREATE_VM fails with EINTR when a signal arrives while it registers
    // its MMU notifier (mm_take_all_locks); try again, as QEMU does.
    let r = this.sys.ioctl(this.fd, IOCTL.KVM_CREATE_VM, type);
    for (let i = 0; r === -EINTR && i < 100; i++) r = this.sys.ioctl(this.fd, IOCTL.KVM_CREATE_VM, type);
    const fd = check('KVM_CREATE_VM', r);
    return new Vm(this, fd);
  }
  close(): void {
    this.sys.close(this.fd);
  }
}
