// One measurement of `npm run bench`: a row of its table, an element of its JSON.
export interface Entry {
  name: string;
  unit: string;
  value: number | null;
  reference?: number;
  ratio?: number;
  note?: string;
}
