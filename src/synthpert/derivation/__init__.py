"""From a Perturb-seq screen (.h5ad) to PerturbQA-style tuples: reading and checking the
file (`screen_file`), the differential-expression tests (`methods`), and the calls, labels
and split built from their statistics (`calls`). Used by `synthpert derive`."""
