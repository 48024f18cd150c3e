"""The joint method (DESIGN §6-§8): the elastic teacher pool, distillation, the student lineage,
screening, paired decisions and the search that evolves the student-teacher pair."""
