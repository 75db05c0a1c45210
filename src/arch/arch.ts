// The architecture of a guest, a KVM host or a lab kernel, named as the
// kernel and Debian name it. Node calls x86_64 'x64': the probe maps Node's
// name once (archOfNode), and the reports print Node's name for a KVM host,
// as they always have (nodeArch).

export const ARCHES = ['x86_64', 'arm64'] as const;
export type Arch = (typeof ARCHES)[number];

export function isArch(s: string): s is Arch {
  return (ARCHES as readonly string[]).includes(s);
}

/** The architecture Node names `name` (process.arch, os.arch()): 'x64' or 'arm64'; undefined for any other. */
export function archOfNode(name: string): Arch | undefined {
  return name === 'x64' ? 'x86_64' : name === 'arm64' ? 'arm64' : undefined;
}

/** Node's name of an architecture, which the reports print for a KVM host ('x64', 'arm64'). */
export function nodeArch(a: Arch): string {
  return a === 'x86_64' ? 'x64' : a;
}
