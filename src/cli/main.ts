// kvmharness command line: thin; parsing and exit codes only.
import { Command, CommanderError, Option } from 'commander';
import { writeFileSync } from 'node:fs';
import { SMOKE } from '../checks/smoke.js';
import { Kvm } from '../kvm/kvm.js';
import { HostError } from '../kvm/sys.js';
import { formatProfile, probe } from '../probe/probe.js';
import { human, json, junit, ktap } from '../report/report.js';
import { exitStatus, runChecks } from '../run/runner.js';
import type { Check } from '../run/types.js';
import { scenarioCheck } from '../run/engine.js';
import { builtinScenarios, loadScenario, resolveScenario, ScenarioError } from '../scenario/load.js';
import { registerWalk, WalkUsageError } from './walk.js';

/** A usage error: exit status 2 with one line. */
class UsageError extends Error {}

/** Each built-in scenario as two checks: results and A/D, then KVM's walker trace. */
function scenarioChecks(): Check[] {
  return builtinScenarios().flatMap((name) => {
    const sc = loadScenario(resolveScenario(name));
    return [scenarioCheck(sc), scenarioCheck(sc, { trace: true })];
  });
}

function suites(): Record<string, readonly Check[]> {
  return { smoke: SMOKE, scenarios: scenarioChecks() };
}

/**
 * Resolves names to checks, in the order given: suite names, check names, or
 * paths of scenario files (anything ending in .json).
 */
export function selectChecks(names: string[]): Check[] {
  const all = suites();
  if (names.length === 0) return Object.values(all).flat();
  const everything = Object.values(all).flat();
  const out: Check[] = [];
  for (const n of names) {
    let found: readonly Check[];
    if (n.endsWith('.json')) {
      const sc = loadScenario(n);
      found = [scenarioCheck(sc), scenarioCheck(sc, { trace: true })];
    } else {
      found = all[n] ?? everything.filter((c) => c.name === n);
    }
    if (found.length === 0) throw new UsageError(`unknown check or suite '${n}' (see \`kvmharness run --list\`)`);
    for (const c of found) if (!out.some((o) => o.name === c.name)) out.push(c);
  }
  return out;
}

function deviceOption(): Option {
  return new Option('--device <path>', 'KVM device (default: $KVMHARNESS_DEVICE or /dev/kvm)');
}

export function program(): Command {
  const p = new Command('kvmharness')
    .description('Drives /dev/kvm, models both dimensions of paging, and cross-checks the model against what KVM did')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  p.command('probe')
    .description('print this host\'s KVM profile and the oracles it offers')
    .option('--json', 'print JSON')
    .addOption(deviceOption())
    .action((o: { json?: boolean; device?: string }) => {
      const prof = probe(o.device);
      console.log(o.json ? JSON.stringify(prof, null, 2) : formatProfile(prof));
    });

  p.command('run')
    .description('run checks against KVM (default: every built-in check)')
    .argument('[names...]', 'checks or suites to run')
    .option('--json', 'print the report as JSON')
    .option('--ktap', 'print the report as KTAP')
    .option('--junit <file>', 'also write a JUnit XML report to FILE')
    .option('--list', 'list the checks and exit')
    .addOption(deviceOption())
    .action(async (names: string[], o: { json?: boolean; ktap?: boolean; junit?: string; list?: boolean; device?: string }) => {
      if (o.json && o.ktap) throw new UsageError('--json and --ktap are exclusive');
      const checks = selectChecks(names);
      if (o.list) {
        for (const c of checks) console.log(`${c.name.padEnd(28)} ${c.description}`);
        return;
      }
      const prof = probe(o.device);
      const kvm = Kvm.open(o.device);
      try {
        const live = !o.json && !o.ktap && process.stderr.isTTY;
        const report = await runChecks(checks, kvm, prof, {
          onResult: live ? (r) => process.stderr.write(`${r.outcome === 'pass' ? '.' : r.outcome === 'not_applicable' ? 's' : 'F'}`) : undefined,
        });
        if (live) process.stderr.write('\n');
        console.log(o.json ? json(report) : o.ktap ? ktap(report) : human(report));
        if (o.junit) writeFileSync(o.junit, junit(report) + '\n');
        process.exitCode = exitStatus(report);
      } finally {
        kvm.close();
      }
    });

  registerWalk(p);
  return p;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`kvmharness: ${msg}\n`);
    const expected = e instanceof HostError || e instanceof UsageError || e instanceof ScenarioError || e instanceof WalkUsageError;
    if (process.env.KVMHARNESS_DEBUG && e instanceof Error && !expected) process.stderr.write(`${e.stack}\n`);
    return 2;
  }
}
