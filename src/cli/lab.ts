// kvmharness lab: run the checks against the KVM of a kernel under test,
// booted in QEMU. The checks, models and reports stay in this process; the
// lab's agent performs the KVM calls.
import type { Command } from 'commander';
import { labFetch } from '../lab/fetch/index.js';
import { ARCHES, isArch, type Arch } from '../arch/arch.js';
import { DEFAULT_PROFILE, LabError, PROFILES } from '../lab/profiles.js';
import { FAULT_ENV, withFault } from '../lab/fault.js';
import { openLab, type LabSessionOptions } from '../lab/session.js';
import { compareAb } from '../lab/ab.js';
import { abTable } from '../report/ab-table.js';
import { matrixTable } from '../report/matrix-table.js';
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
}

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
  return { profile, arch, modparams: o.modparams, kernel: o.kernel, modules: o.modules, bootTimeoutMs: timeout, log };
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
    .action(async (o: { refresh?: boolean; arch?: string }) => {
      const only = archOption(o.arch);
      for (const arch of only ? [only] : ARCHES) {
        const k = await labFetch({ log, refresh: o.refresh, arch });
        console.log(`${k.arch} kernel ${k.version}: ${k.image ?? k.vmlinux ?? k.bzImage}`);
      }
    });

  const labOptions = (c: Command) =>
    c
      .option('--arch <arch>', "x86_64 or arm64 (default: the profile's)")
      .option('--kernel <image>', 'your kernel (bzImage or vmlinux) instead of the cached Debian one')
      .option('--modules <dir>', "your kernel's modules directory (lib/modules/<version>)")
      .option('--modparams <params>', "extra module parameters, e.g. 'kvm.eager_page_split=0'")
      .option('--boot-timeout <s>', 'give up on a boot after this many seconds (default 60)');

  labOptions(lab.command('run'))
    .description('boot the kernel with one profile and run `kvmharness run` against its KVM')
    .option(
      '--baseline-kernel <image>',
      'A/B: also run against this kernel and report the checks whose outcomes or times differ',
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
          const runs = async (kernel: string | undefined, modules: string | undefined, label: string) => {
            log(`${label}: ${kernel ?? 'the cached Debian kernel'}`);
            const s = await openLab({ ...sessionOptions(o, runProfile(o)), kernel, modules });
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
          const mine = await runs(o.kernel, o.modules, 'kernel');
          const ab = compareAb(base, mine);
          if (ro.json)
            console.log(
              JSON.stringify({ baseline: o.baselineKernel, kernel: o.kernel ?? null, repeat, ...ab }, null, 2),
            );
          else console.log(abTable(ab, { baseline: o.baselineKernel, kernel: o.kernel ?? 'the cached Debian kernel' }));
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

  labOptions(lab.command('probe'))
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
    .description('run `kvmharness run` under every profile and tabulate the results per profile')
    .argument('[run...]', 'arguments of `kvmharness run`, after --')
    .action(async (rest: string[], o: LabCliOptions, c: Command) => {
      const { names, o: ro } = runArgs(c, rest);
      const checks = checksFor(names, ro);
      const results = new Map<string, RunReport | string>();
      // Your own kernel (--kernel) is of one architecture: --arch, else x86_64.
      const only = o.arch ?? (o.kernel ? 'x86_64' : undefined);
      for (const p of PROFILES) {
        if (only && p.arch !== only) {
          results.set(
            p.name,
            `not run: ${o.arch ? `--arch ${o.arch}` : `--kernel is an ${only} kernel (add --arch to choose)`}`,
          );
          continue;
        }
        log(`profile ${p.name}`);
        const s = await openLab(sessionOptions(o, p.name));
        try {
          results.set(p.name, await runReport(s.target, checks, { ...ro, json: true }));
        } finally {
          await s.close();
        }
      }
      console.log(matrixTable(results));
      const failed = [...results.values()].some((r) => typeof r !== 'string' && exitStatus(r) !== 0);
      process.exitCode = failed ? 1 : 0;
    });
  return lab;
}
