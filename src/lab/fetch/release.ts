// The lab's kernel releases: Debian's stock kernels named by their kernel
// series, each from the Debian suite that ships it, each cached apart.
import { join } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import { LabError } from '../profiles.js';

/** A kernel release the lab fetches by name. */
export interface LabRelease {
  /** The kernel series, the release's name: "6.12". */
  name: string;
  /** The Debian suite whose linux-image-amd64 / -arm64 is of that series. */
  suite: string;
}

/** Oldest first; the last is the newest, the default. */
export const RELEASES: readonly LabRelease[] = [
  { name: '6.1', suite: 'bookworm' },
  { name: '6.12', suite: 'trixie' },
  { name: '7.2', suite: 'sid' },
];

export const NEWEST_RELEASE = RELEASES[RELEASES.length - 1]!.name;

/** The release of that name (a kernel series, or the suite's name: "bookworm", "trixie", "sid"). */
export function labRelease(name: string | undefined): LabRelease {
  if (name === undefined) return RELEASES[RELEASES.length - 1]!;
  const r = RELEASES.find((x) => x.name === name || x.suite === name);
  if (!r)
    throw new LabError(
      `unknown lab release '${name}' (known: ${RELEASES.map((x) => `${x.name} (${x.suite})`).join(', ')})`,
    );
  return r;
}

/** Whether a name is one of the lab's releases (and not a path to a kernel image). */
export const isReleaseName = (s: string): boolean => RELEASES.some((x) => x.name === s || x.suite === s);

/**
 * Where a release's kernel of `arch` is cached: 6.1 where the lab has always
 * kept its one kernel, `<cache>/<arch>`; the others in `<cache>/<release>/<arch>`.
 */
export function releaseRoot(cache: string, release: LabRelease, arch: Arch): string {
  return release.name === '6.1' ? join(cache, arch) : join(cache, release.name, arch);
}

/** Throws unless the package's kernel (its upstream version "6.12.117-1") is of the release's series. */
export function checkSeries(release: LabRelease, pkgVersion: string, pkg: string): void {
  const series = /^(\d+\.\d+)[.-]/.exec(pkgVersion)?.[1];
  if (series !== release.name) {
    throw new LabError(
      `Debian ${release.suite}'s kernel is now ${pkg} ${pkgVersion}, not of the ${release.name} series the lab names by '${release.name}'`,
    );
  }
}
