// The vocabulary of the scenario's field tables: one Spec per JSON value, and
// the small constructors the tables (schema.ts, steps.ts) are written with.
// The readers of the tables (checkJson, jsonSchema, fieldReference) are in
// schema.ts.

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

interface Doc {
  /** One sentence for the schema's description and the docs. */
  doc: string;
}

/** A 64-bit (or 32-bit) value: "0x..." or a non-negative safe integer. */
export interface U64Spec extends Doc {
  kind: 'u64';
  bits: 32 | 64;
}
export interface IntSpec extends Doc {
  kind: 'int';
  min: number;
  max: number;
}
export interface EnumSpec extends Doc {
  kind: 'enum';
  values: readonly (string | number)[];
}
export interface BoolSpec extends Doc {
  kind: 'bool';
}
export interface StringSpec extends Doc {
  kind: 'string';
  pattern?: { re: string; what: string };
}
/** false, or a #PF error code (32-bit value). */
export interface FaultSpec extends Doc {
  kind: 'fault';
}
/** Stat name -> expected delta over the step (see stats.ts). */
export interface StatsSpec extends Doc {
  kind: 'stats';
}
export interface ArraySpec extends Doc {
  kind: 'array';
  items: Spec;
}
export interface Field {
  spec: Spec;
  required?: true;
  /** Default in the JSON form; absent and not required means "not given". */
  default?: Json;
  /** Default as the docs should say it, when it is not a constant. */
  defaultDoc?: string;
}
export interface ObjectSpec extends Doc {
  kind: 'object';
  /** Heading in the docs. */
  name: string;
  fields: Record<string, Field>;
}
/** Objects told apart by which tag field they carry ("guest" or "host") and its value. */
export interface TaggedSpec extends Doc {
  kind: 'tagged';
  name: string;
  variants: readonly { tag: string; value: string; spec: ObjectSpec }[];
}
export type Spec =
  U64Spec | IntSpec | EnumSpec | BoolSpec | StringSpec | FaultSpec | StatsSpec | ArraySpec | ObjectSpec | TaggedSpec;

export const u64 = (doc: string): U64Spec => ({ kind: 'u64', bits: 64, doc });
export const u32 = (doc: string): U64Spec => ({ kind: 'u64', bits: 32, doc });
export const bool = (doc: string): BoolSpec => ({ kind: 'bool', doc });
export const oneOf = (values: readonly (string | number)[], doc: string): EnumSpec => ({ kind: 'enum', values, doc });
export const int = (min: number, max: number, doc: string): IntSpec => ({ kind: 'int', min, max, doc });
export const object = (name: string, doc: string, fields: Record<string, Field>): ObjectSpec => ({
  kind: 'object',
  name,
  doc,
  fields,
});
export const array = (items: Spec, doc: string): ArraySpec => ({ kind: 'array', items, doc });
export const req = (spec: Spec): Field => ({ spec, required: true });
export const opt = (spec: Spec, dflt?: Json): Field => (dflt === undefined ? { spec } : { spec, default: dflt });
