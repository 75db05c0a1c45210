// kvmharness lab: run the checks against the KVM of a kernel under test,
// booted in QEMU. The checks, models and reports stay in this process; the
// lab's agent performs the KVM calls.
import type { Command } from 'commander';
import { labFetch, labRelease, RELEASES } from '../lab/fetch/index.js';
import { ARCHES, isArch, type Arch } from '../arch/arch.js';
import { DEFAULT_PROFILE, LabError, PROFILES, profile as profileNamed } from '../lab/profiles.js';
import { labSource } from '../lab/kvm-source.js';
import { FAULT_ENV, withFault } from '../lab/fault.js';
import { openLab, type LabSessionOptions } from '../lab/session.js';
import { compareAb } from '../lab/ab.js';
import { abTable } from '../report/ab-table.js';
import { matrixTable } from '../report/matrix-table.js';
import { releaseDiffs, type ReleaseCell } from '../report/release-diff.js';
import { probe } from '../probe/probe.js';
import { formatProfile, profileJson } from '../report/profile.js';
import { exitStatus } from '../run/runner.js';
import type { RunReport } from '../run/types.js';
import { addRunOptions, checksFor, printReport, runReport, type RunCliOptions } from './run.js';

const log = (s: string) => void process.stderr.write(`${s.startsWith('lab: ') ? s : `lab: ${s}`}\n`);

interface LabCliOptions {
  arch?: string;
  profile?: string;
  kernel?: string;
  modules?: string;
  modparams?: string;
  bootTimeout?: string;
  release?: string;
  kvmSource?: string;
}

const RELEASE_NAMES = RELEASES.map((r) => `${r.name} (${r.suite})`).join(', ');

/** --arch, checked: x86_64 or arm64. */
function archOption(arch: string | undefined): Arch | undefined {
  if (!arch) return undefined;
  if (!isArch(arch)) throw new LabError(`--arch must be ${ARCHES.join(' or ')}, got '${arch}'`);
  return arch;
}

function sessionOptions(o: LabCliOptions, profile: string): LabSessionOptions {
  const arch = archOption(o.arch);
  const timeout = o.bootTimeout === undefined ? undefined : Number(o.bootTimeout) * 1000;
  if (timeout !== undefined && !(timeout > 0))
    throw new LabError(`--boot-timeout needs a positive number of seconds, got '${o.bootTimeout}'`);
  if (o.release !== undefined) labRelease(o.release);
  return {
    profile,
    arch,
    modparams: o.modparams,
    kernel: o.kernel,
    modules: o.modules,
    release: o.release,
    kvmSource: o.kvmSource,
    bootTimeoutMs: timeout,
    log,
  };
}

/** The profile of `lab run`: --profile, else the default of --arch (arm64: nvhe). */
function runProfile(o: LabCliOptions & { profile?: string }): string {
  return o.profile ?? (o.arch === 'arm64' ? 'nvhe' : DEFAULT_PROFILE);
}

/** The access-matrix sample of a lab run without --sample: one batch. */
const LAB_MATRIX_SAMPLE = 2048;

/** `lab run -- <run arguments>`: the arguments after `--` are those of `kvmharness run`. */
function runArgs(c: Command, rest: string[]): { names: string[]; o: RunCliOptions } {
  const sub = addRunOptions(c.createCommand('run')).exitOverride();
  sub.parse(rest[0] === 'run' ? rest.slice(1) : rest, { from: 'user' });
  const o = { ...sub.opts<RunCliOptions>(), progressLines: true };
  if (o.sample === undefined) {
    // Every batch of the access matrix crosses the lab's serial line (about 30 cases/s).
    o.sample = String(LAB_MATRIX_SAMPLE);
    if (sub.args.length === 0 || sub.args.includes('access-matrix'))
      log(`the access matrix checks a ${LAB_MATRIX_SAMPLE}-case sample in the lab (--sample N for more)`);
  }
  return { names: sub.args, o };
}

export function registerLab(program: Command): Command {
  const lab = program
    .command('lab')
    .description('run the checks against the KVM of a kernel under test, booted in QEMU');

  lab
    .command('fetch')
    .description("download and unpack Debian's stock kernel and what the lab needs (cached per user)")
    .option('--refresh', 'download again even if cached')
    .option('--arch <arch>', 'x86_64 or arm64 (default: both)')
    .option('--release <names>', `kernel release(s), comma-separated: ${RELEASE_NAMES} (default: the newest)`)
    .action(async (o: { refresh?: boolean; arch?: string; release?: string }) => {
      const only = archOption(o.arch);
      const releases =
        o.release === undefined ? [labRelease(undefined)] : o.release.split(',').map((r) => labRelease(r.trim()));
      for (const release of releases) {
        for (const arch of only ? [only] : ARCHES) {
          const k = await labFetch({ log, refresh: o.refresh, arch, release: release.name });
          console.log(`${release.name} ${k.arch} kernel ${k.version}: ${k.image ?? k.vmlinux ?? k.bzImage}`);
        }
      }
    });

  lab
    .command('source')
    .description(
      "unpack Debian's source of a release's exact x86 kernel (KVM's directories) into DIR, for --kvm-source",
    )
    .option('--release <name>', `${RELEASE_NAMES} (default: the newest)`)
    .option('--full', 'the whole tree, not only arch/x86/kvm and virt/kvm')
    .argument('<dir>', 'an empty or new directory')
    .action(async (dir: string, o: { release?: string; full?: boolean }) => {
      console.log(await labSource({ release: o.release, dir, full: o.full, log }));
    });

  const labOptions = (c: Command) =>
    c
      .option('--arch <arch>', "x86_64 or arm64 (default: the profile's)")
      .option(
        '--kernel <image>',
        'your kernel (bzImage or vmlinux) instead of the cached Debian one, or a release name',
      )
      .option('--modules <dir>', "your kernel's modules directory (lib/modules/<version>)")
      .option('--modparams <params>', "extra module parameters, e.g. 'kvm.eager_page_split=0'")
      .option(
        '--kvm-source <dir>',
        "x86: build KVM from this kernel source tree against the release's headers and boot it",
      )
      .option('--boot-timeout <s>', 'give up on a boot after this many seconds (default 60)');

  const release = (c: Command) =>
    c.option('--release <name>', `the lab kernel: ${RELEASE_NAMES} (default: the newest)`);

  release(labOptions(lab.command('run')))
    .description('boot the kernel with one profile and run `kvmharness run` against its KVM')
    .option(
      '--baseline-kernel <image>',
      'A/B: also run against this kernel (an image or a release name) and report the checks whose outcomes or times differ',
    )
    .option('--baseline-modules <dir>', "the baseline kernel's modules directory")
    .option('--repeat <n>', 'A/B: runs of the checks per kernel, for the timing comparison (default 3)')
    .option(
      '--profile <name>',
      `${PROFILES.map((p) => p.name).join(', ')} (default ${DEFAULT_PROFILE}; with --arch arm64, nvhe)`,
    )
    .argument('[run...]', 'arguments of `kvmharness run`, after --')
    .action(
      async (
        rest: string[],
        o: LabCliOptions & { profile?: string; baselineKernel?: string; baselineModules?: string; repeat?: string },
        c: Command,
      ) => {
        const { names, o: ro } = runArgs(c, rest);
        const checks = checksFor(names, ro);
        if (o.baselineKernel !== undefined || o.baselineModules !== undefined || o.repeat !== undefined) {
          if (o.baselineKernel === undefined)
            throw new LabError('--baseline-modules and --repeat need --baseline-kernel');
          const repeat = o.repeat === undefined ? 3 : Number(o.repeat);
          if (!Number.isInteger(repeat) || repeat < 1)
            throw new LabError(`--repeat needs an integer >= 1, got '${o.repeat}'`);
          const runs = async (
            kernel: string | undefined,
            modules: string | undefined,
            label: string,
            release?: string,
          ) => {
            log(`${label}: ${kernel ?? `the cached Debian kernel ${labRelease(release).name}`}`);
            const s = await openLab({
              ...sessionOptions(o, runProfile(o)),
              kernel,
              modules,
              release,
              kvmSource: label === 'kernel' ? o.kvmSource : undefined,
            });
            const out: RunReport[] = [];
            try {
              for (let i = 0; i < repeat; i++) {
                log(`${label}: run ${i + 1}/${repeat}`);
                out.push(await runReport(s.target, checks, { ...ro, json: true }));
              }
            } finally {
              await s.close();
            }
            return out;
          };
          const base = await runs(o.baselineKernel, o.baselineModules, 'baseline');
          const mine = await runs(o.kernel, o.modules, 'kernel', o.release);
          const ab = compareAb(base, mine);
          const kernelLabel = o.kernel ?? `the cached Debian kernel ${labRelease(o.release).name}`;
          if (ro.json)
            console.log(
              JSON.stringify({ baseline: o.baselineKernel, kernel: o.kernel ?? null, repeat, ...ab }, null, 2),
            );
          else console.log(abTable(ab, { baseline: o.baselineKernel, kernel: kernelLabel }));
          process.exitCode = ab.outcomeDiffs > 0 || mine.some((r) => exitStatus(r) !== 0) ? 1 : 0;
          return;
        }
        const s = await openLab(sessionOptions(o, runProfile(o)));
        let report: RunReport;
        try {
          const fault = process.env[FAULT_ENV];
          report = await runReport(s.target, fault ? withFault(checks, fault, s.lab.pid) : checks, ro);
        } finally {
          await s.close();
        }
        await printReport(report, ro);
        process.exitCode = exitStatus(report);
      },
    );

  release(labOptions(lab.command('probe')))
    .description(
      "boot the kernel with one profile and print its KVM's profile and oracles, as `kvmharness probe` does here",
    )
    .option(
      '--profile <name>',
      `${PROFILES.map((p) => p.name).join(', ')} (default ${DEFAULT_PROFILE}; with --arch arm64, nvhe)`,
    )
    .option('--json', 'print JSON')
    .action(async (o: LabCliOptions & { profile?: string; json?: boolean }) => {
      const s = await openLab(sessionOptions(o, runProfile(o)));
      try {
        const prof = probe(s.target);
        console.log(o.json ? profileJson(prof) : formatProfile(prof));
      } finally {
        await s.close();
      }
    });

  labOptions(lab.command('matrix'))
    .description('run `kvmharness run` under every profile (and release) and tabulate the results per profile')
    .option(
      '--release <names>',
      `comma-separated releases, each a column group: ${RELEASE_NAMES} (default: the newest)`,
    )
    .option('--profile <names>', 'comma-separated profiles (default: all)')
    .argument('[run...]', 'arguments of `kvmharness run`, after --')
    .action(async (rest: string[], o: LabCliOptions & { profile?: string }, c: Command) => {
      const { names, o: ro } = runArgs(c, rest);
      const checks = checksFor(names, ro);
      const releases =
        o.release === undefined ? [undefined] : o.release.split(',').map((r) => labRelease(r.trim()).name);
      if (releases.length > 1 && o.kernel)
        throw new LabError('--release with several releases and --kernel: give one of them');
      const profiles = o.profile === undefined ? PROFILES : o.profile.split(',').map((n) => profileNamed(n.trim()));
      const results = new Map<string, RunReport | string>();
      const cells: ReleaseCell[] = [];
      // Your own kernel (--kernel) is of one architecture: --arch, else x86_64.
      const only = o.arch ?? (o.kernel ? 'x86_64' : undefined);
      for (const release of releases) {
        for (const p of profiles) {
          const col = releases.length > 1 ? `${release}/${p.name}` : p.name;
          if (only && p.arch !== only) {
            results.set(
              col,
              `not run: ${o.arch ? `--arch ${o.arch}` : `--kernel is an ${only} kernel (add --arch to choose)`}`,
            );
            continue;
          }
          log(`profile ${p.name}${release ? ` (release ${release})` : ''}`);
          let report: RunReport | string;
          try {
            const s = await openLab({ ...sessionOptions({ ...o, release: undefined }, p.name), release });
            try {
              report = await runReport(s.target, checks, { ...ro, json: true });
            } finally {
              await s.close();
            }
          } catch (e) {
            // One release that does not boot a profile does not hide the others.
            if (!(e instanceof LabError) || releases.length < 2) throw e;
            log(`${col}: ${e.message.split('\n')[0]}`);
            report = `did not boot: ${e.message.split('\n')[0]}`;
          }
          results.set(col, report);
          cells.push({ release: release ?? '', profile: p.name, report });
        }
      }
      console.log(matrixTable(results));
      if (releases.length > 1) {
        const diffs = releaseDiffs(cells);
        console.log(`\n${diffs.length} check(s) whose outcome differs between releases${diffs.length ? ':' : ''}`);
        for (const d of diffs) console.log(`  ${d}`);
      }
      const failed = [...results.values()].some((r) =>
        typeof r !== 'string' ? exitStatus(r) !== 0 : r.startsWith('did not boot'),
      );
      process.exitCode = failed ? 1 : 0;
    });
  return lab;
}
