// The verdict "not applicable here": the host does not offer what a check or
// a guest needs. Thrown by guest builders, observers and checks; the runner
// reports it as not_applicable, never as a pass or a failure.

/** The host does not offer what a check or a guest needs: "not applicable here", never a pass. */
export class NotApplicable extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'NotApplicable';
  }
}
