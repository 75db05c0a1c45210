// Kernel images: the formats the lab boots (an x86 bzImage, an ELF vmlinux
// with a PVH entry, an arm64 Image), the release each carries, and the
// uncompressed kernel inside a bzImage.
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { LabError } from '../profiles.js';
import { which } from './tools.js';

/** Reads up to n bytes from the start of a file. */
export function head(path: string, n: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(n);
    return b.subarray(0, readSync(fd, b, 0, n, 0));
  } finally {
    closeSync(fd);
  }
}

export const isElf = (b: Buffer): boolean => b.length >= 64 && b.readUInt32BE(0) === 0x7f454c46;
/** The arm64 Image header: magic "ARM\x64" at offset 0x38 (Documentation/arm64/booting.rst). */
export const isArm64Image = (b: Buffer): boolean => b.length >= 64 && b.readUInt32LE(0x38) === 0x644d5241;
export const isBzImage = (b: Buffer): boolean => b.length >= 0x260 && b.toString('latin1', 0x202, 0x206) === 'HdrS';

/** The release word of a bzImage's kernel_version string ("6.1.0-56-amd64 (debian-kernel@…) #1 …"). */
export function bzImageRelease(b: Buffer): string | undefined {
  const off = b.readUInt16LE(0x20e);
  if (!off || off + 0x200 >= b.length) return undefined;
  const end = b.indexOf(0, off + 0x200);
  return b.toString('latin1', off + 0x200, end < 0 ? undefined : end).split(' ')[0] || undefined;
}

/** The release in an uncompressed kernel's banner "Linux version 6.1.0-56-amd64 (…". */
export function elfRelease(b: Buffer): string | undefined {
  const at = b.indexOf('Linux version ');
  if (at < 0) return undefined;
  return /^Linux version (\S+)/.exec(b.toString('latin1', at, at + 200))?.[1];
}

/** Whether a 64-bit x86 ELF kernel carries the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) that QEMU boots directly. */
export function hasPvhNote(b: Buffer): boolean {
  if (!isElf(b) || b[4] !== 2 || b[5] !== 1) return false; // ELFCLASS64, little-endian
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (ph + 56 > b.length || b.readUInt32LE(ph) !== 4) continue; // PT_NOTE
    const off = Number(b.readBigUInt64LE(ph + 8));
    const end = Math.min(off + Number(b.readBigUInt64LE(ph + 32)), b.length);
    for (let n = off; n + 12 <= end;) {
      const namesz = b.readUInt32LE(n);
      const descsz = b.readUInt32LE(n + 4);
      const type = b.readUInt32LE(n + 8);
      const name = b.toString('latin1', n + 12, n + 12 + Math.max(0, namesz - 1));
      if (name === 'Xen' && type === 18) return true;
      n += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3);
    }
  }
  return false;
}

/** The compressed kernel inside a bzImage, by its header's payload fields. */
function bzPayload(b: Buffer): Buffer {
  const setupSects = b[0x1f1] || 4;
  const start = (setupSects + 1) * 512 + b.readUInt32LE(0x248);
  const len = b.readUInt32LE(0x24c);
  if (start > 0 && len > 0 && start + len <= b.length) return b.subarray(start, start + len);
  // Old header: find the XZ stream by its magic.
  const xz = b.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
  if (xz < 0) throw new LabError('cannot find the compressed kernel in the bzImage');
  return b.subarray(xz);
}

/** Writes the uncompressed ELF kernel inside a bzImage to `out` (XZ with `xz -dc --single-stream`, gzip in-process, zstd with `zstd -dc`). */
export function extractVmlinux(bzImage: string, out: string): void {
  const b = readFileSync(bzImage);
  if (!isBzImage(b)) throw new LabError(`${bzImage} is not a bzImage (no HdrS header)`);
  const p = bzPayload(b);
  let tool: [string, string[]] | undefined;
  let input = p;
  if (p.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])))
    tool = ['xz', ['-dc', '--single-stream']];
  else if (p.readUInt32LE(0) === 0xfd2fb528) {
    // zstd reads on after its frame: give it the frame without the bzImage's 4 size bytes.
    tool = ['zstd', ['-dcq']];
    input = p.subarray(0, p.length - 4);
  } else if (p[0] === 0x1f && p[1] === 0x8b) {
    writeFileSync(out, gunzipSync(p.subarray(0, p.length - 4)));
    return;
  }
  if (!tool)
    throw new LabError(
      `${bzImage}: the kernel is compressed in a format the lab cannot unpack (magic ${p.subarray(0, 4).toString('hex')}); pass the uncompressed vmlinux instead`,
    );
  if (!which(tool[0])) throw new LabError(`${bzImage} is ${tool[0]}-compressed and ${tool[0]} is not installed`);
  const tmp = `${out}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w');
  try {
    const r = spawnSync(tool[0], tool[1], { input, stdio: ['pipe', fd, 'pipe'], maxBuffer: 1 << 20 });
    // xz stops at the end of its stream (--single-stream); the 4 size bytes after it are the bzImage's.
    if (r.status !== 0 || statSync(tmp).size === 0)
      throw new LabError(
        `${tool[0]} could not unpack the kernel in ${bzImage}: ${(r.stderr?.toString() ?? '').trim().split('\n')[0] ?? r.error?.message}`,
      );
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, out);
}
