// The lab's kernel: Debian's stock x86_64 or arm64 kernel fetched into a
// per-user cache, or the user's own kernel and modules, checked for what the
// lab needs before any boot.
//
// Nothing is installed system-wide except tools (QEMU, xz): the kernel and
// busybox packages are downloaded with `apt-get download` and unpacked with
// `dpkg-deb -x` into the cache (apt.ts). A second labFetch() (fetch.ts) reads
// the cache's manifest (cache.ts) and runs no apt command at all. A kernel is
// checked (kernel.ts) from its image (image.ts), its module tree (modules.ts)
// and its config (config.ts); resolveKernel() (resolve.ts) takes the user's.
export { labCacheDir } from './cache.js';
export { labFetch } from './fetch.js';
export type { LabKernel } from './kernel.js';
export { loadOrder, moduleTree, readModule } from './modules.js';
export { isReleaseName, labRelease, NEWEST_RELEASE, RELEASES, type LabRelease } from './release.js';
export { resolveKernel } from './resolve.js';
export { which } from './tools.js';
