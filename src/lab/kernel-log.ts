// What a kernel under test said went wrong: BUG, oops, panic, a WARN from
// KVM, lockups and hung tasks, found in its console or in /dev/kmsg records,
// each named as the kernel named it ("kernel BUG in __handle_changed_spte:
// Invalid SPTE change: ...") with the lines around it. Text in, problems out.
import type { KernelProblem } from '../kvm/target.js';

/** Lines of context kept before a problem's first line, and at most after it. */
const BEFORE = 8;
const AFTER = 40;

/** "[   12.345678] text": the timestamp, in seconds, and the text. */
function split(line: string): { ts?: number; text: string } {
  const m = /^\[\s*(\d+\.\d+)\]\s?(.*)$/.exec(line);
  return m ? { ts: Number(m[1]), text: m[2]! } : { text: line };
}

const CUT_HERE = /-+\[ cut here \]-+/;
/** The location of a crash: x86's RIP line, arm64's pc line. */
const WHERE = /(?:^RIP: [0-9a-f]{4}:|^pc : |^EIP: )\[?<?[0-9a-f]*>?\]? ?([A-Za-z_.][\w.]*)\+0x/;

interface Rule {
  re: RegExp;
  /** A WARNING counts only when it comes from KVM (its file or module). */
  kvmOnly?: boolean;
  title(m: RegExpExecArray, where: string | undefined, said: string | undefined): string;
}

const inFn = (where: string | undefined) => (where ? ` in ${where}` : '');
const withSaid = (said: string | undefined) => (said ? `: ${said}` : '');

const OOPS: Rule = { re: /^Oops: (.*)$/, title: (m, w) => `Oops: ${m[1]}${inFn(w)}` };

const RULES: readonly Rule[] = [
  { re: /kernel BUG at (\S+?)!?$/, title: (m, w, s) => `kernel BUG ${w ? `in ${w}` : `at ${m[1]}`}${withSaid(s)}` },
  {
    re: /^WARNING: CPU: \d+ PID: \d+ at (\S+)(?::\d+)? ([A-Za-z_.][\w.]*)\+0x\S*(.*)$/,
    kvmOnly: true,
    title: (m, _w, s) => `WARNING in ${m[2]}${withSaid(s)}`,
  },
  { re: /BUG: (soft lockup|workqueue lockup)\b.*$/, title: (m) => m[0] },
  OOPS,
  { re: /^Internal error: (.*)$/, title: (m, w) => `Internal error: ${m[1]}${inFn(w)}` },
  { re: /BUG: (.*?)(?:,? (?:at )?address:? ?[0-9a-fx]+)?$/, title: (m, w) => `BUG: ${m[1]}${inFn(w)}` },
  {
    re: /^(?:rcu: )?INFO: (rcu_\w+ (?:self-)?detected stalls?.*|task .* blocked for more than \d+ seconds)/,
    title: (m) => m[1]!,
  },
  { re: /^NMI watchdog: Watchdog detected hard LOCKUP.*$/, title: (m) => m[0] },
  { re: /^Kernel panic - not syncing: (.*)$/, title: (m) => `kernel panic: ${m[1]}` },
];

/** Whether a WARNING's location is KVM's: a file under a kvm directory, or a kvm module. */
function fromKvm(text: string): boolean {
  return /\/kvm\/|\bkvm[\w-]*\.c\b|\[kvm(?:_\w+)?\]/.test(text);
}

/**
 * The message the kernel printed just before a BUG or WARN (a pr_err, or
 * WARN's format): the first of the lines that came with it (timestamps at
 * most 50 ms apart; without timestamps, the line just before), stopping at a
 * "cut here" line or another problem. A BUG prints its "cut here" line after
 * the message, a WARN before it.
 */
function saidBefore(
  lines: readonly { ts?: number; text: string }[],
  at: number,
  starts: ReadonlySet<number>,
  bug: boolean,
): string | undefined {
  let i = at - 1;
  if (bug) while (i >= 0 && CUT_HERE.test(lines[i]!.text)) i--;
  let first: number | undefined;
  let ref = lines[at]!.ts;
  for (let n = 0; i >= 0 && n < 8; i--, n++) {
    const l = lines[i]!;
    if (!l.text.trim() || CUT_HERE.test(l.text) || starts.has(i) || /KVMHARNESS-LAB-/.test(l.text)) break;
    if (ref === undefined || l.ts === undefined) {
      first ??= i;
      break;
    }
    if (ref - l.ts > 0.05) break;
    first = i;
    ref = l.ts;
  }
  return first === undefined ? undefined : lines[first]!.text.trim() || undefined;
}

/** The problems in a piece of kernel log (console lines, or kmsg messages one a line), in order. */
export function kernelProblems(text: string): KernelProblem[] {
  const raw = text.split('\n').map((l) => l.replace(/\r$/, ''));
  const lines = raw.map(split);
  const found: { at: number; rule: Rule; m: RegExpExecArray }[] = [];
  lines.forEach((l, at) => {
    for (const rule of RULES) {
      const m = rule.re.exec(l.text);
      if (!m) continue;
      // x86 prints "Oops: ..." a few lines after the BUG: line that says what happened.
      const sameOops = rule.title === OOPS.title && found.length > 0 && at - found[found.length - 1]!.at <= 6;
      if ((!rule.kvmOnly || fromKvm(l.text)) && !sameOops) found.push({ at, rule, m });
      break;
    }
  });
  const starts = new Set(found.map((f) => f.at));
  return found.map(({ at, rule, m }, k) => {
    const end = Math.min(found[k + 1]?.at ?? lines.length, at + AFTER);
    let where: string | undefined;
    for (let i = at; i < Math.min(lines.length, at + AFTER) && !where; i++) where = WHERE.exec(lines[i]!.text)?.[1];
    const said = rule === RULES[0] || rule === RULES[1] ? saidBefore(lines, at, starts, rule === RULES[0]) : undefined;
    let from = at;
    while (from > 0 && at - from < BEFORE && !starts.has(from - 1) && lines[from - 1]!.text.trim()) from--;
    return { message: rule.title(m, where, said), excerpt: raw.slice(from, Math.max(end, at + 1)) };
  });
}
