// A kernel's .config: parsed into a map, found beside the image or in a build
// tree, or read from the image itself (CONFIG_IKCONFIG).
import { existsSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { gunzipSync } from 'node:zlib';

/** A kernel config as a map: CONFIG_X → "y" | "m" | "n" | value. */
export function parseConfig(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split('\n')) {
    const set = /^(CONFIG_\w+)=(.*)$/.exec(line);
    if (set) m.set(set[1]!, set[2]!.replace(/^"(.*)"$/, '$1'));
    const unset = /^# (CONFIG_\w+) is not set/.exec(line);
    if (unset) m.set(unset[1]!, 'n');
  }
  return m;
}

/** The config embedded by CONFIG_IKCONFIG in an uncompressed kernel, if any. */
function embeddedConfig(image: Buffer): string | undefined {
  const st = image.indexOf('IKCFG_ST');
  if (st < 0) return undefined;
  const ed = image.indexOf('IKCFG_ED', st);
  try {
    return gunzipSync(image.subarray(st + 8, ed < 0 ? undefined : ed)).toString('utf8');
  } catch {
    return undefined;
  }
}

/** Where a kernel's config may be: config-<v> beside the image or in ../boot, .config of a build tree, the module tree's build link. */
function configCandidates(image: string, version: string | undefined, modulesDir: string | undefined): string[] {
  const dir = dirname(image);
  const out: string[] = [];
  if (version) out.push(join(dir, `config-${version}`));
  out.push(join(dir, '.config'), resolve(dir, '../../../.config')); // vmlinux in the tree root; arch/x86/boot/bzImage
  if (modulesDir) {
    out.push(join(modulesDir, 'build', '.config'), join(modulesDir, 'config'));
    const v = version ?? basename(modulesDir);
    out.push(resolve(modulesDir, '../../../boot', `config-${v}`));
  }
  return out;
}

/**
 * The config of the user's kernel at `image`: the file given, else the first
 * candidate that exists (configCandidates), else the text embedded in the
 * uncompressed `kernel`. Logs when there is none.
 */
export function findConfig(
  o: { given?: string; image: string; kernel: Buffer; version?: string; modulesDir?: string },
  log: (s: string) => void,
): { config?: string; configText?: string } {
  const configText = o.given ? undefined : embeddedConfig(o.kernel);
  const config = o.given ?? configCandidates(o.image, o.version, o.modulesDir).find((p) => existsSync(p));
  if (!config && configText === undefined) log('lab: no kernel config found; checking the module tree only');
  return { config, configText: config ? undefined : configText };
}
